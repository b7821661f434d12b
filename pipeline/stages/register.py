"""Register: add the trained model to the MLflow registry and decide on ``champion``.

The new version gets alias ``challenger``. It also becomes ``champion`` when there is none
yet, or when it beats the current champion on today's test split by at least
``register.min_delta`` in ``register.metric``. Both models are loaded back from the registry
and re-scored on the same test split, so an old champion is never trusted on an old number.
Writes ``reports/register.json``: name, version, aliases, the comparison and the decision.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.config import load_params
from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, read_json, run_stage, write_json
from pipeline.models import MODELS_DIR

METRICS = Path("reports/evaluate/metrics.json")
REPORT = Path("reports/register.json")


def score_registered(uri: str, data, metric: str, batch_size: int) -> float:
    """Load a registered model and score it on the test split."""
    import mlflow

    from pipeline.stages.evaluate import predict, score

    try:
        net = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:
        raise StageError(f"cannot load {uri} from the registry: {exc}") from None
    x, y = data.tensors["test"]
    headline, _ = score(y.numpy(), predict(net, x, batch_size), data.manifest.classes)
    return headline[metric]


def register(params, run: dict, test_metrics: dict, data) -> dict:
    """Register, re-score, move aliases; return the decision record."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    reg = params.register_
    tracking.setup(params.mlflow.experiment)
    client = MlflowClient()
    name = reg.model_name
    batch = params.evaluate.batch_size
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Classifier trained by the Runway pipeline."
        )
    mine = client.search_model_versions(f"name='{name}' and run_id='{run['run_id']}'")
    if mine:
        version = max(mine, key=lambda v: int(v.version))
    else:
        version = mlflow.register_model(
            run["model_uri"],
            name,
            tags={f"test.{k}": f"{v:.6f}" for k, v in test_metrics.items()}
            | tracking.git_info()
            | {"data.dvc_md5": tracking.dvc_hash(PREPARED_DIR)},
        )
    client.set_registered_model_alias(name, "challenger", version.version)

    new_score = score_registered(f"models:/{name}/{version.version}", data, reg.metric, batch)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None

    comparison = {"metric": reg.metric, "min_delta": reg.min_delta, "challenger": new_score}
    if champion is None:
        promote, reason = True, "no champion yet"
    elif champion.version == version.version:
        promote, reason = False, "this version is already the champion"
        comparison["champion"] = new_score
    else:
        old = score_registered(f"models:/{name}@champion", data, reg.metric, batch)
        comparison["champion"] = old
        comparison["champion_version"] = int(champion.version)
        promote = new_score >= old + reg.min_delta
        sign = ">=" if promote else "<"
        reason = (
            f"{reg.metric} {new_score:.4f} {sign} champion v{champion.version}'s {old:.4f} "
            f"+ min_delta {reg.min_delta:g} on today's test split"
        )
    if promote:
        client.set_registered_model_alias(name, "champion", version.version)
    aliases = client.get_model_version(name, version.version).aliases
    return {
        "model_name": name,
        "version": int(version.version),
        "run_id": run["run_id"],
        "aliases": sorted(aliases),
        "promoted": promote,
        "reason": reason,
        "comparison": comparison,
        "test_metrics": test_metrics,
        "uri": f"models:/{name}/{version.version}",
    }


def main() -> None:
    params = load_params()
    from pipeline.training import load_prepared

    for path in (MODELS_DIR / "run.json", METRICS):
        if not path.exists():
            raise StageError(f"{path} not found: run the train and evaluate stages first")
    run = read_json(MODELS_DIR / "run.json")
    test_metrics = read_json(METRICS)["test"]
    data = load_prepared(splits=("test",))
    record = register(params, run, test_metrics, data)
    write_json(REPORT, record)
    verdict = "promoted to champion" if record["promoted"] else "champion unchanged"
    print(
        f"[register] {record['model_name']} version {record['version']} "
        f"(aliases: {', '.join(record['aliases'])}): {verdict}: {record['reason']}"
    )


if __name__ == "__main__":
    run_stage("register", main)
