"""The model, seeded training and the tuning helpers."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelParams, Params, TrainParams, parse_params
from pipeline.models.cnn import build_cnn
from pipeline.stages.train import merged_params
from pipeline.stages.tune import fail_stale_trials, study_name
from pipeline.training import fit


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 32, 32]])
def test_cnn_takes_raw_pixels_of_any_small_size(shape):
    net = build_cnn(shape, 10, [0.0, 255.0], channels=8, dropout=0.1).eval()
    out = net(torch.full((4, *shape), 255.0))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_training_is_seeded_and_learns(digits_prepared):
    hp = TrainParams(max_epochs=3, batch_size=32, accelerator="cpu")
    model = ModelParams(channels=8)
    first, _ = fit(hp, model, digits_prepared, [])
    second, _ = fit(hp, model, digits_prepared, [])
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x, y = digits_prepared.tensors["val"]
    first.eval()
    with torch.no_grad():
        accuracy = (first(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # three epochs already far above chance (0.1)


def test_best_params_override_train_and_model_sections(tmp_path):
    best = tmp_path / "best_params.json"
    best.write_text('{"lr": 0.01, "optimizer": "sgd", "channels": 16, "model": "mlp"}')
    params = parse_params({"train": {"lr": 0.001}})
    hp, model = merged_params(params, best)
    assert (hp.lr, hp.optimizer, hp.max_epochs) == (0.01, "sgd", TrainParams().max_epochs)
    assert (model.name, model.channels, model.dropout) == ("mlp", 16, ModelParams().dropout)
    assert merged_params(params, tmp_path / "absent.json")[0].lr == 0.001
    best.write_text('{"learning_rate": 0.01}')
    with pytest.raises(Exception, match="learning_rate"):
        merged_params(params, best)
    best.write_text('{"model": "vgg"}')
    with pytest.raises(Exception, match="model.name: 'vgg' is not allowed"):
        merged_params(params, best)


def test_study_name_changes_with_what_makes_trials_comparable():
    base = Params()
    assert study_name(base, "abc.dir") == study_name(Params(), "abc.dir")
    assert study_name(base, "abc.dir") != study_name(base, "def.dir")
    wider = parse_params({"tune": {"search_space": {"lr": [0.0001, 0.1]}}})
    assert study_name(wider, "abc.dir") != study_name(base, "abc.dir")
    more = parse_params({"tune": {"n_trials": 50}})
    assert study_name(more, "abc.dir") == study_name(base, "abc.dir")  # resume with more


def test_interrupted_trials_are_marked_failed(tmp_path):
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    study.ask()  # left RUNNING, as by a killed process
    study.tell(study.ask(), 1.0)
    reloaded = optuna.load_study(study_name="s", storage=storage)
    assert fail_stale_trials(reloaded) == 1
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]


def test_model_name_is_a_tuning_dimension_when_the_search_space_lists_it():
    from optuna.trial import FixedTrial

    from pipeline.stages.tune import suggest

    params = parse_params({"tune": {"search_space": {"model": ["cnn", "mlp"]}}})
    values = {"lr": 0.01, "batch_size": 32, "channels": 16, "dropout": 0.1}
    values |= {"weight_decay": 1e-5, "optimizer": "sgd", "model": "mlp"}
    hp, model = suggest(FixedTrial(values), params.tune, params.train, params.model)
    assert (model.name, model.channels, model.dropout) == ("mlp", 16, 0.1)
    assert (hp.lr, hp.batch_size, hp.max_epochs) == (0.01, 32, params.tune.epochs)
    without = parse_params({})
    _, model = suggest(FixedTrial(values), without.tune, without.train, without.model)
    assert model.name == "cnn"  # not in the search space: params.yaml's model.name
