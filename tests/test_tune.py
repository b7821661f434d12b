"""Tuning: study names, interrupted trials, the search space."""

from __future__ import annotations

from pipeline.config import Params, parse_params
from pipeline.stages.tune import fail_stale_trials, study_name


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
