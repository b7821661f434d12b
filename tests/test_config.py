"""params.yaml is checked before anything runs; errors name the key."""

from __future__ import annotations

import pytest

from pipeline.config import ParamsError, load_params, parse_params
from tests.conftest import ROOT, copy_project, edit_params, run


def test_repository_params_are_valid():
    params = load_params(path=ROOT / "params.yaml")
    assert params.data.source == "digits"
    split = params.validate_.split
    assert split.train + split.val + split.test == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lr": -0.1}}, "train.lr: Input should be greater than 0"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: 'rmsprop' is not allowed"),
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
        ({"tarin": {}}, "tarin: unknown key"),
        ({"validate": {"split": {"train": 0.5, "val": 0.2, "test": 0.2}}}, "must sum to 1"),
        ({"tune": {"search_space": {"lr": [0.1, 0.001]}}}, "lr: low 0.1 is above high 0.001"),
        ({"tune": {"n_trials": -1}}, "tune.n_trials"),
        ({"register": {"min_delta": 2}}, "register.min_delta"),
        ({"data": {"source": "imagenet"}}, "data.source: 'imagenet' is not allowed"),
        (
            {"tune": {"val_check_interval": 0.3}},
            "tune.val_check_interval: 0.3: expected 1 over a whole number of checks an epoch",
        ),
        ({"tune": {"val_check_interval": 0.001}}, "tune.val_check_interval: Input should be"),
        (
            {"tune": {"val_check_interval": 0.5}, "train": {"accumulate_grad_batches": 2}},
            "tune.val_check_interval: 0.5 validates trials inside an epoch, and "
            "train.accumulate_grad_batches: 2 steps the optimiser once every few batches",
        ),
    ],
)
def test_bad_values_name_the_key(raw, expected):
    """(And the values next to them that are fine.)"""
    with pytest.raises(ParamsError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        parse_params(raw)


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {lr: 0.01}\n")
    with pytest.raises(ParamsError, match="no section 'nope'"):
        load_params("nope", path=path)


@pytest.mark.slow
def test_a_stage_with_a_bad_param_exits_non_zero_and_writes_nothing(tmp_path):
    project = copy_project(tmp_path)
    edit_params(project, {"data": {"source": "mnsit"}})
    result = run(["python", "-m", "pipeline.stages.ingest"], project, check=False)
    assert result.returncode == 1
    assert "data.source: 'mnsit' is not allowed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (project / "data/raw").exists()


def test_check_fractions_and_their_neighbours():
    assert parse_params({"tune": {"val_check_interval": 0.333}}).tune.checks_per_epoch == 3
    assert parse_params({"tune": {"val_check_interval": 0.01}}).tune.checks_per_epoch == 100
    with pytest.raises(ParamsError, match=r"0\.3: .*; the nearest is 1/3\)"):
        parse_params({"tune": {"val_check_interval": 0.3}})
    # Tuning off: the checks never run, so accumulating gradients is no conflict.
    off = {"n_trials": 0, "val_check_interval": 0.5}
    assert parse_params({"tune": off, "train": {"accumulate_grad_batches": 2}}).tune.n_trials == 0
