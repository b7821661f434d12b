"""Register: add the trained model to the MLflow registry and decide on ``champion``.

The new version gets alias ``challenger``. It also becomes ``champion`` when there is none
yet, or when it beats the current champion on today's test split: strictly better in
``register.metric``, and by at least ``register.min_delta`` (a tie never promotes). Both
models are loaded back from the registry and re-scored on the same test split, so an old
champion is never trusted on an old number.

A class is identified by its name, never by its output position: every model records its
class names (MLflow model metadata ``class_names``, and the output names of its signature),
and both models' outputs are mapped to today's classes by name. When today's data has a class
the champion does not know (a new class folder, a renamed class), both models are compared on
the test samples of the classes the champion knows, and the decision says so.
Writes ``reports/register.json``: name, version, aliases, the comparison and the decision.

Never promoted: a model that predicts fewer than two classes on the test split, or whose test
accuracy is no better than chance (always predicting the most frequent test class), even when
there is no champion yet; a model whose evaluation is missing, non-finite, or does not match
what the registered model scores on the test split (the evaluation was of another model); and
a model whose test split was drawn under other ``validate.split`` fractions than the
champion's (the champion may have trained on today's test samples, so the comparison would be
unfair).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import device as devices
from pipeline import tracking
from pipeline.config import load_params
from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, read_json, require, run_stage, write_json
from pipeline.models import MODELS_DIR, class_names
from pipeline.stages.evaluate import METRICS, named, predict, score

REPORT = Path("reports/register.json")


@dataclass
class Predictions:
    """A registered model's predictions on today's test split, in today's class numbering."""

    names: list[str]  # the model's classes, in output order
    recorded: bool  # False: the model records no class names; output i is taken as class "i"
    predicted: np.ndarray  # today's class index per test sample; -1: a class today's data lacks

    def knows(self, today: list[str]) -> list[int]:
        """Today's class indices this model can predict."""
        mine = set(self.names)
        return [i for i, name in enumerate(today) if name in mine]


def in_today_numbering(names: list[str], today: list[str]) -> np.ndarray:
    """Model output index → today's class index, matched by class name (-1: not a class of
    today's data). Class identity is the name: adding or renaming a class renumbers the others."""
    lookup = {name: i for i, name in enumerate(today)}
    return np.array([lookup.get(name, -1) for name in names], dtype=np.int64)


def registered_predictions(uri: str, data, batch_size: int, device="cpu") -> Predictions:
    """Load a registered model onto ``device`` and predict today's test split with it."""
    import mlflow
    import torch

    try:
        net = mlflow.pytorch.load_model(uri, map_location=device)
        metadata = mlflow.models.get_model_info(uri).metadata or {}
    except Exception as exc:
        raise StageError(f"cannot load {uri} from the registry: {exc}") from None
    x, _ = data.tensors["test"]
    names = metadata.get("class_names")
    recorded = bool(names)
    if not recorded:
        with torch.no_grad():  # two rows: an exported graph may specialise a batch of one
            width = net.to(device)(x[:2].to(device, torch.float32)).shape[1]
        names = [str(i) for i in range(width)]
    names = [str(n) for n in names]
    today = class_names(data.manifest)
    outputs = predict(net, x, batch_size, device)
    return Predictions(names, recorded, in_today_numbering(names, today)[outputs])


def scored(y: np.ndarray, predicted: np.ndarray, classes: list[int], metric: str) -> float:
    """``metric`` over the test samples whose true class is in ``classes``."""
    keep = np.isin(y, classes)
    headline, _ = score(y[keep], predicted[keep], classes)
    return headline[metric]


def never_promoted(y: np.ndarray, predicted: np.ndarray, today: list[str]) -> str | None:
    """Why a model must not become champion whatever the champion scores, or None.

    The rule: a model that predicts fewer than two classes on the test split, or whose test
    accuracy is no better than chance (the accuracy of always predicting the test split's most
    frequent class), is never promoted, not even when there is no champion yet."""
    distinct = np.unique(predicted)
    if len(distinct) < 2:
        only = today[distinct[0]] if len(distinct) and distinct[0] >= 0 else "an unknown class"
        return f"it predicts one class ({only!r}) for all {len(y)} test samples"
    counts = np.bincount(y, minlength=len(today))
    chance = counts.max() / len(y)
    accuracy = float((predicted == y).mean())
    if accuracy <= chance:
        return (
            f"its test accuracy {accuracy:.4f} is no better than chance ({chance:.4f}, always "
            f"predicting the most frequent class {today[int(counts.argmax())]!r})"
        )
    return None


def beats(new: float, old: float, min_delta: float) -> bool:
    """The promotion rule: strictly better, and by at least ``min_delta``."""
    return new > old and new - old >= min_delta


HEADLINE = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def check_evaluation(test_metrics: object) -> dict[str, float]:
    """The evaluate stage's headline metrics (keyed ``accuracy``, ... from metrics.json's
    ``test/accuracy``, ...), or an error saying what is wrong with them."""
    names = named({k: k for k in HEADLINE})  # "test/accuracy" → "accuracy"
    if not isinstance(test_metrics, dict) or set(names) - set(test_metrics):
        raise StageError(f"{METRICS}: expected test metrics {list(names)}; evaluate again")
    bad = {
        name: test_metrics[name]
        for name in names
        if not isinstance(test_metrics[name], int | float)
        or not math.isfinite(test_metrics[name])
        or not 0 <= test_metrics[name] <= 1
    }
    if bad:
        raise StageError(f"{METRICS}: evaluation failed, metrics {bad} are not in [0, 1]")
    return {key: float(test_metrics[name]) for name, key in names.items()}


def split_rule(params) -> str:
    split = params.validate_.split
    return f"train={split.train:g},val={split.val:g},test={split.test:g}"


def describe_decision(
    client, name: str, version: str, promoted: bool, reason: str, aliases: list[str]
) -> None:
    """Put the decision on the model version itself: its description (shown on the version's
    page in the UI) and tags ``promotion.decision`` and ``promotion.reason``."""
    verdict = "promoted to champion" if promoted else "not promoted"
    client.update_model_version(
        name,
        version,
        description=f"Aliases {', '.join(aliases)} when registered: {verdict}: {reason}.",
    )
    client.set_model_version_tag(name, version, "promotion.decision", verdict)
    client.set_model_version_tag(name, version, "promotion.reason", reason)


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
    device = devices.available(params.train.accelerator)
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
            tags={k: f"{v:.6f}" for k, v in named(test_metrics).items()}
            | tracking.git_info()
            | {"data.dvc_md5": tracking.dvc_hash(PREPARED_DIR), "data.split": split_rule(params)},
        )
    today = class_names(data.manifest)
    y = data.tensors["test"][1].numpy()
    everything = list(range(len(today)))
    mine = registered_predictions(f"models:/{name}/{version.version}", data, batch, device)
    if mine.recorded and mine.names != today:
        raise StageError(
            f"registered version {version.version} was trained on classes {mine.names} but "
            f"{PREPARED_DIR} has {today}: run train and evaluate again. Not promoted."
        )
    new_score = scored(y, mine.predicted, everything, reg.metric)
    one_sample = 1.0 / max(len(y), 1)
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
    already = champion is not None and champion.version == version.version
    if already:
        promote, reason = False, "this version is already the champion"
        comparison["champion"] = new_score
    elif champion is None:
        promote, reason = True, "no champion yet"
    elif champion.tags.get("data.split", split_rule(params)) != split_rule(params):
        promote = False
        reason = (
            f"champion v{champion.version} was tested on a split drawn with "
            f"{champion.tags['data.split']}, this model with {split_rule(params)}: the test "
            "sets differ, so they are not compared (set the champion alias by hand if intended)"
        )
    else:
        theirs = registered_predictions(f"models:/{name}@champion", data, batch, device)
        known = theirs.knows(today)
        comparison["champion_version"] = int(champion.version)
        comparison["classes_compared"] = [today[i] for i in known]
        comparison["champion_unknown_classes"] = [n for n in today if n not in theirs.names]
        if not theirs.recorded:
            comparison["champion_class_names"] = "not recorded: output i taken as class 'i'"
        if not known:
            promote = True
            reason = (
                f"champion v{champion.version} predicts none of today's classes {today} (it "
                f"knows {theirs.names}), so it cannot be compared; the challenger replaces it"
            )
        else:
            new = scored(y, mine.predicted, known, reg.metric)
            old = scored(y, theirs.predicted, known, reg.metric)
            comparison |= {"challenger": new, "champion": old}
            if len(known) < len(today):
                comparison["challenger_all_classes"] = new_score
            promote = beats(new, old, reg.min_delta)
            if promote:
                verdict = "beats"
            elif new == old:
                verdict = "ties (a tie does not promote)"
            else:
                verdict = "does not beat"
            where = "on today's test split"
            if len(known) < len(today):
                samples = int(np.isin(y, known).sum())
                missing = ", ".join(repr(n) for n in comparison["champion_unknown_classes"])
                where += (
                    f", compared on the {len(known)} of {len(today)} classes the champion knows "
                    f"({samples} of {len(y)} samples; it cannot predict {missing})"
                )
            reason = (
                f"{reg.metric} {new:.4f} {verdict} champion v{champion.version}'s {old:.4f} "
                f"by min_delta {reg.min_delta:g} {where}"
            )
    unfit = never_promoted(y, mine.predicted, today)
    if unfit and not already:
        compared = "" if champion is None else f" (and {reason})"
        promote, reason = False, f"never promoted: {unfit}{compared}"
    if promote:
        client.set_registered_model_alias(name, "champion", version.version)
    aliases = client.get_model_version(name, version.version).aliases
    if not already:  # a re-run for the same version keeps the decision it got
        describe_decision(client, name, version.version, promote, reason, sorted(aliases))
    return {
        "model_name": name,
        "version": int(version.version),
        "run_id": run["run_id"],
        "aliases": sorted(aliases),
        "promoted": promote,
        "reason": reason,
        "comparison": comparison,
        "test_metrics": named(test_metrics),
        "uri": f"models:/{name}/{version.version}",
    }


def main() -> None:
    params = load_params()
    from pipeline.data.loader import load_prepared

    run = read_json(require(MODELS_DIR / "run.json", "train"))
    require(METRICS, "evaluate")
    try:
        test_metrics = check_evaluation(read_json(METRICS))
    except (ValueError, AttributeError):
        raise StageError(f"{METRICS}: not a metrics file; run evaluate again") from None
    data = load_prepared(splits=("test",), placement=params.train.data_placement)
    print(f"[register] device {devices.describe(devices.available(params.train.accelerator))}")
    with tracking.store_errors():  # a store locked or broken mid-way: one line, not a trace
        record = register(params, run, test_metrics, data)
    write_json(REPORT, record)
    verdict = "promoted to champion" if record["promoted"] else "champion unchanged"
    print(
        f"[register] {record['model_name']} version {record['version']} "
        f"(aliases: {', '.join(record['aliases'])}): {verdict}: {record['reason']}"
    )


if __name__ == "__main__":
    run_stage("register", main)
