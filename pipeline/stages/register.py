"""Register: add the trained model to the MLflow registry and decide on ``champion``.

The new version gets alias ``challenger``. It also becomes ``champion`` when there is none
yet, or when it beats the current champion on today's test split: strictly better in
``register.metric``, and by at least ``register.min_delta`` (a tie never promotes). Both
models are loaded back from the registry and re-scored on the same test split, so an old
champion is never trusted on an old number.
Writes ``reports/register.json``: name, version, aliases, the comparison and the decision.

Never promoted: a model whose evaluation is missing, non-finite, or does not match what the
registered model scores on the test split (the evaluation was of another model); and a model
whose test split was drawn under other ``validate.split`` fractions than the champion's (the
champion may have trained on today's test samples, so the comparison would be unfair).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline import device as devices
from pipeline import tracking
from pipeline.config import load_params
from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, read_json, require, run_stage, write_json
from pipeline.models import MODELS_DIR
from pipeline.stages.evaluate import METRICS

REPORT = Path("reports/register.json")


def score_registered(uri: str, data, metric: str, batch_size: int, device="cpu") -> float:
    """Load a registered model onto ``device`` and score it on the test split."""
    import mlflow

    from pipeline.stages.evaluate import predict, score

    try:
        net = mlflow.pytorch.load_model(uri, map_location=device)
    except Exception as exc:
        raise StageError(f"cannot load {uri} from the registry: {exc}") from None
    x, y = data.tensors["test"]
    predicted = predict(net, x, batch_size, device)
    headline, _ = score(y.numpy(), predicted, data.manifest.classes)
    return headline[metric]


def beats(new: float, old: float, min_delta: float) -> bool:
    """The promotion rule: strictly better, and by at least ``min_delta``."""
    return new > old and new - old >= min_delta


HEADLINE = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def check_evaluation(test_metrics: object) -> dict[str, float]:
    """The evaluate stage's headline metrics, or an error saying what is wrong with them."""
    if not isinstance(test_metrics, dict) or set(HEADLINE) - set(test_metrics):
        raise StageError(f"{METRICS}: expected test metrics {list(HEADLINE)}; evaluate again")
    bad = {
        k: test_metrics[k]
        for k in HEADLINE
        if not isinstance(test_metrics[k], int | float)
        or not math.isfinite(test_metrics[k])
        or not 0 <= test_metrics[k] <= 1
    }
    if bad:
        raise StageError(f"{METRICS}: evaluation failed, metrics {bad} are not in [0, 1]")
    return {k: float(test_metrics[k]) for k in HEADLINE}


def split_rule(params) -> str:
    split = params.validate_.split
    return f"train={split.train:g},val={split.val:g},test={split.test:g}"


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
    device = devices.resolve(params.train.accelerator)
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
            | {"data.dvc_md5": tracking.dvc_hash(PREPARED_DIR), "data.split": split_rule(params)},
        )
    new_score = score_registered(
        f"models:/{name}/{version.version}", data, reg.metric, batch, device
    )
    one_sample = 1.0 / max(len(data.tables["test"]), 1)
    if abs(new_score - test_metrics[reg.metric]) > 1.5 * one_sample:
        raise StageError(
            f"{METRICS} says {reg.metric} {test_metrics[reg.metric]:.4f} but registered version "
            f"{version.version} scores {new_score:.4f} on the test split: the evaluation is "
            "not of this model; run evaluate again. Not promoted."
        )
    client.set_registered_model_alias(name, "challenger", version.version)

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
    elif champion.tags.get("data.split", split_rule(params)) != split_rule(params):
        promote = False
        reason = (
            f"champion v{champion.version} was tested on a split drawn with "
            f"{champion.tags['data.split']}, this model with {split_rule(params)}: the test "
            "sets differ, so they are not compared (set the champion alias by hand if intended)"
        )
    else:
        old = score_registered(f"models:/{name}@champion", data, reg.metric, batch, device)
        comparison["champion"] = old
        comparison["champion_version"] = int(champion.version)
        promote = beats(new_score, old, reg.min_delta)
        if promote:
            verdict = "beats"
        elif new_score == old:
            verdict = "ties (a tie does not promote)"
        else:
            verdict = "does not beat"
        reason = (
            f"{reg.metric} {new_score:.4f} {verdict} champion v{champion.version}'s {old:.4f} "
            f"by min_delta {reg.min_delta:g} on today's test split"
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

    run = read_json(require(MODELS_DIR / "run.json", "train"))
    require(METRICS, "evaluate")
    try:
        test_metrics = check_evaluation(read_json(METRICS).get("test"))
    except (ValueError, AttributeError):
        raise StageError(f"{METRICS}: not a metrics file; run evaluate again") from None
    data = load_prepared(splits=("test",))
    print(f"[register] device {devices.describe(devices.resolve(params.train.accelerator))}")
    record = register(params, run, test_metrics, data)
    write_json(REPORT, record)
    verdict = "promoted to champion" if record["promoted"] else "champion unchanged"
    print(
        f"[register] {record['model_name']} version {record['version']} "
        f"(aliases: {', '.join(record['aliases'])}): {verdict}: {record['reason']}"
    )


if __name__ == "__main__":
    run_stage("register", main)
