"""The registry gate, against a real MLflow store: champion moves only for a better model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.config import parse_params
from pipeline.io import StageError
from pipeline.models.cnn import Scale
from pipeline.stages.evaluate import named, predict, score
from pipeline.stages.register import check_evaluation, register


def _linear_model(digits_prepared, fit: bool | int) -> torch.nn.Module:
    """A linear classifier: fitted by least squares on train (good), on its first ``fit``
    samples (weaker, still far above chance), or random (no better than chance)."""
    x, y = digits_prepared.tensors["train"]
    if fit is not True and fit:
        x, y = x[:fit], y[:fit]
    flat = torch.cat([x.reshape(len(x), -1) / 16.0, torch.ones(len(x), 1)], dim=1)
    if fit:
        target = torch.nn.functional.one_hot(y, 10).float()
        weights = torch.linalg.lstsq(flat, target).solution
    else:
        weights = torch.randn(65, 10, generator=torch.Generator().manual_seed(0))
    linear = torch.nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(weights[:64].T)
        linear.bias.copy_(weights[64])
    return torch.nn.Sequential(Scale(0.0, 16.0), torch.nn.Flatten(), linear).eval()


WEAK = 100  # training samples for the weaker least-squares model


def _log(net, digits_prepared, class_names: list[str] | None = None) -> dict:
    """Log ``net`` as the train stage does (with ``class_names`` as its metadata if given)."""
    import mlflow

    experiment = tracking.setup("runway-digits")
    example = digits_prepared.tensors["train"][0][:2].numpy()
    metadata = {"class_names": class_names} if class_names else None
    with tracking.run(experiment, "train", {"stage": "train"}) as run:
        info = mlflow.pytorch.log_model(
            net, name="model", input_example=example, pip_requirements=["torch"], metadata=metadata
        )
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "net": net}


def _evaluated(logged, digits_prepared) -> dict:
    """What the evaluate stage would have written for this model."""
    x, y = digits_prepared.tensors["test"]
    headline, _ = score(y.numpy(), predict(logged["net"], x, 512), digits_prepared.manifest.classes)
    return headline


def test_champion_moves_only_when_beaten(mlflow_store, digits_prepared):
    params = parse_params({"register": {"model_name": "gate-test", "min_delta": 0.01}})
    bad = _log(_linear_model(digits_prepared, fit=WEAK), digits_prepared)
    good = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    bad_again = _log(_linear_model(digits_prepared, fit=WEAK), digits_prepared)

    first = register(params, bad, _evaluated(bad, digits_prepared), digits_prepared)
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert first["aliases"] == ["challenger", "champion"]

    second = register(params, good, _evaluated(good, digits_prepared), digits_prepared)
    assert second["promoted"] and second["version"] == first["version"] + 1
    assert second["comparison"]["challenger"] > second["comparison"]["champion"] + 0.01
    assert second["comparison"]["champion_version"] == first["version"]

    third = register(params, bad_again, _evaluated(bad_again, digits_prepared), digits_prepared)
    assert not third["promoted"] and third["aliases"] == ["challenger"]
    from mlflow.tracking import MlflowClient

    # The decision is on each version itself, as register.json has it.
    for decision in (first, second, third):
        version = MlflowClient().get_model_version("gate-test", str(decision["version"]))
        verdict = "promoted to champion" if decision["promoted"] else "not promoted"
        assert version.tags["promotion.decision"] == verdict
        assert version.tags["promotion.reason"] == decision["reason"]
        assert version.description == (
            f"Aliases {', '.join(decision['aliases'])} when registered: {verdict}: "
            f"{decision['reason']}."
        )
    assert third["version"] == second["version"] + 1  # distinct versions
    assert "does not beat champion v" in third["reason"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    champion = client.get_model_version_by_alias("gate-test", "champion")
    assert int(champion.version) == second["version"]
    # Re-running register for the same run reuses its version instead of duplicating it.
    again = register(params, good, _evaluated(good, digits_prepared), digits_prepared)
    assert again["version"] == second["version"]
    assert again["reason"] == "this version is already the champion"
    kept = client.get_model_version("gate-test", str(second["version"]))
    assert kept.tags["promotion.reason"] == second["reason"]  # not overwritten by the re-run


def test_challenger_within_min_delta_is_not_promoted(mlflow_store, digits_prepared):
    params = parse_params({"register": {"model_name": "delta-test", "min_delta": 0.5}})
    first = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    second = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    register(params, first, _evaluated(first, digits_prepared), digits_prepared)
    decision = register(params, second, _evaluated(second, digits_prepared), digits_prepared)
    scores = decision["comparison"]
    assert scores["challenger"] == pytest.approx(scores["champion"])
    assert not decision["promoted"]
    assert np.isfinite(scores["challenger"])


def test_gate_refuses_an_evaluation_of_another_model_or_a_failed_one(mlflow_store, digits_prepared):
    params = parse_params({"register": {"model_name": "eval-test"}})
    good = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    bad = _log(_linear_model(digits_prepared, fit=False), digits_prepared)
    with pytest.raises(StageError, match="the evaluation is not of this model.*Not promoted"):
        register(params, bad, _evaluated(good, digits_prepared), digits_prepared)
    from mlflow.tracking import MlflowClient

    with pytest.raises(Exception, match="champion"):
        MlflowClient().get_model_version_by_alias("eval-test", "champion")
    evaluated = named(_evaluated(good, digits_prepared))
    assert check_evaluation(evaluated) == _evaluated(good, digits_prepared)
    old_layout = {"test": _evaluated(good, digits_prepared)}  # {"test": {"accuracy": ...}}
    for broken in ({"test/accuracy": 0.9}, {k: float("nan") for k in evaluated}, old_layout):
        with pytest.raises(StageError, match="metrics.json"):
            check_evaluation(broken)


def test_gate_never_compares_models_tested_under_different_splits(mlflow_store, digits_prepared):
    first = _log(_linear_model(digits_prepared, fit=WEAK), digits_prepared)
    second = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    params = parse_params({"register": {"model_name": "split-test"}})
    register(params, first, _evaluated(first, digits_prepared), digits_prepared)
    resplit = parse_params(
        {
            "register": {"model_name": "split-test"},
            "validate": {"split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        }
    )
    decision = register(resplit, second, _evaluated(second, digits_prepared), digits_prepared)
    assert not decision["promoted"]  # better, but not comparable
    assert "train=0.7,val=0.15,test=0.15" in decision["reason"]
    assert decision["aliases"] == ["challenger"]


def test_a_tie_does_not_promote(mlflow_store, digits_prepared):
    params = parse_params({"register": {"model_name": "tie-test"}})  # min_delta 0
    first = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    same = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    assert register(params, first, _evaluated(first, digits_prepared), digits_prepared)["promoted"]
    tie = register(params, same, _evaluated(same, digits_prepared), digits_prepared)
    assert tie["comparison"]["challenger"] == tie["comparison"]["champion"]
    assert not tie["promoted"] and tie["aliases"] == ["challenger"]
    assert "ties (a tie does not promote)" in tie["reason"]


def _make_champion(name: str, logged: dict) -> None:
    """Register ``logged`` and give it the champion alias directly, as a model trained on
    earlier data (with other classes) would have it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(logged["model_uri"], name)
    MlflowClient().set_registered_model_alias(name, "champion", version.version)


def _outputs(net: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """``net`` with only the outputs ``keep``, in that order."""
    index = torch.tensor(keep)

    class Select(torch.nn.Module):
        def forward(self, x):
            return x.index_select(1, index)

    return torch.nn.Sequential(net, Select()).eval()


def test_models_are_compared_by_class_name_not_output_position(mlflow_store, digits_prepared):
    """A champion whose outputs are in another order (its classes were numbered otherwise)
    scores the same as the challenger once both are mapped to today's class names; by output
    position it would score near zero and any challenger would be promoted."""
    params = parse_params({"register": {"model_name": "names-test"}})
    good = _linear_model(digits_prepared, fit=True)
    order = [3, 0, 9, 1, 2, 8, 4, 7, 5, 6]
    _make_champion(
        "names-test", _log(_outputs(good, order), digits_prepared, list(map(str, order)))
    )
    same = _log(good, digits_prepared, [str(c) for c in range(10)])
    tie = register(params, same, _evaluated(same, digits_prepared), digits_prepared)
    assert (
        tie["comparison"]["champion"]
        == tie["comparison"]["challenger"]
        == pytest.approx(_evaluated(same, digits_prepared)["accuracy"])
    )
    assert not tie["promoted"] and "ties (a tie does not promote)" in tie["reason"]


def test_a_champion_that_lacks_a_class_is_compared_on_the_classes_it_knows(
    mlflow_store, digits_prepared
):
    params = parse_params({"register": {"model_name": "known-test"}})
    good = _linear_model(digits_prepared, fit=True)
    nine = list(range(9))
    _make_champion("known-test", _log(_outputs(good, nine), digits_prepared, list(map(str, nine))))
    challenger = _log(good, digits_prepared, [str(c) for c in range(10)])
    decision = register(
        params, challenger, _evaluated(challenger, digits_prepared), digits_prepared
    )
    x, y = digits_prepared.tensors["test"]
    known = y.numpy() != 9
    predicted = predict(good, x, 512)
    # Both scored on the samples of classes 0-8 only: the champion as its nine outputs say.
    champion_predicted = predict(_outputs(good, nine), x, 512)
    comparison = decision["comparison"]
    assert comparison["classes_compared"] == [str(c) for c in nine]
    assert comparison["champion_unknown_classes"] == ["9"]
    assert comparison["challenger"] == pytest.approx((predicted == y.numpy())[known].mean())
    assert comparison["challenger_all_classes"] == pytest.approx((predicted == y.numpy()).mean())
    assert comparison["champion"] == pytest.approx((champion_predicted == y.numpy())[known].mean())
    samples = int(known.sum())
    assert (
        f"compared on the 9 of 10 classes the champion knows ({samples} of {len(y)} samples; "
        "it cannot predict '9')" in decision["reason"]
    )


def test_a_model_no_better_than_chance_or_of_one_class_is_never_promoted(
    mlflow_store, digits_prepared
):
    params = parse_params({"register": {"model_name": "chance-test"}})
    random = _log(_linear_model(digits_prepared, fit=False), digits_prepared)
    decision = register(params, random, _evaluated(random, digits_prepared), digits_prepared)
    _, y = digits_prepared.tensors["test"]
    counts = np.bincount(y.numpy())
    chance = counts.max() / len(y)
    accuracy = _evaluated(random, digits_prepared)["accuracy"]
    assert accuracy <= chance
    assert not decision["promoted"] and decision["aliases"] == ["challenger"]
    assert decision["reason"] == (
        f"never promoted: its test accuracy {accuracy:.4f} is no better than chance "
        f"({chance:.4f}, always predicting the most frequent class '{counts.argmax()}')"
    )

    class Constant(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10] * 0 + torch.nn.functional.one_hot(torch.tensor(4), 10)

    constant = _log(Constant(), digits_prepared)
    decision = register(params, constant, _evaluated(constant, digits_prepared), digits_prepared)
    assert not decision["promoted"]
    assert (
        decision["reason"]
        == f"never promoted: it predicts one class ('4') for all {len(y)} test samples"
    )
    from mlflow.tracking import MlflowClient

    with pytest.raises(Exception, match="champion"):
        MlflowClient().get_model_version_by_alias("chance-test", "champion")
