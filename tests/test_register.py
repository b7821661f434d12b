"""The registry gate, against a real MLflow store: champion moves only for a better model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.config import parse_params
from pipeline.models.cnn import Scale
from pipeline.stages.register import register


def _linear_model(digits_prepared, fit: bool) -> torch.nn.Module:
    """A linear classifier: fitted by least squares on train (good) or random (bad)."""
    x, y = digits_prepared.tensors["train"]
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


def _log(net, digits_prepared) -> dict:
    import mlflow

    experiment = tracking.setup("runway-digits")
    example = digits_prepared.tensors["train"][0][:2].numpy()
    with tracking.run(experiment, "train", {"stage": "train"}) as run:
        info = mlflow.pytorch.log_model(
            net, name="model", input_example=example, pip_requirements=["torch"]
        )
    return {"run_id": run.info.run_id, "model_uri": info.model_uri}


def test_champion_moves_only_when_beaten(mlflow_store, digits_prepared):
    params = parse_params({"register": {"model_name": "gate-test", "min_delta": 0.01}})
    bad = _log(_linear_model(digits_prepared, fit=False), digits_prepared)
    good = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    bad_again = _log(_linear_model(digits_prepared, fit=False), digits_prepared)

    first = register(params, bad, {"accuracy": 0.1}, digits_prepared)
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert first["aliases"] == ["challenger", "champion"]

    second = register(params, good, {"accuracy": 0.9}, digits_prepared)
    assert second["promoted"] and second["version"] == first["version"] + 1
    assert second["comparison"]["challenger"] > second["comparison"]["champion"] + 0.01
    assert second["comparison"]["champion_version"] == first["version"]

    third = register(params, bad_again, {"accuracy": 0.1}, digits_prepared)
    assert not third["promoted"] and third["aliases"] == ["challenger"]
    assert third["version"] == second["version"] + 1  # distinct versions
    assert "<" in third["reason"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    champion = client.get_model_version_by_alias("gate-test", "champion")
    assert int(champion.version) == second["version"]
    # Re-running register for the same run reuses its version instead of duplicating it.
    again = register(params, good, {"accuracy": 0.9}, digits_prepared)
    assert again["version"] == second["version"]
    assert again["reason"] == "this version is already the champion"


def test_challenger_within_min_delta_is_not_promoted(mlflow_store, digits_prepared):
    params = parse_params({"register": {"model_name": "delta-test", "min_delta": 0.5}})
    first = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    second = _log(_linear_model(digits_prepared, fit=True), digits_prepared)
    register(params, first, {"accuracy": 0.9}, digits_prepared)
    decision = register(params, second, {"accuracy": 0.9}, digits_prepared)
    scores = decision["comparison"]
    assert scores["challenger"] == pytest.approx(scores["champion"])
    assert not decision["promoted"]
    assert np.isfinite(scores["challenger"])
