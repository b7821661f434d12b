"""Tuning: study names, resuming without repeating, grid search, interrupted trials, plots."""

from __future__ import annotations

import logging
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest

from pipeline.config import Params, parse_params
from pipeline.stages.tune import code_hash, open_study, optimize, study_name, suggest
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_study_name_changes_with_what_makes_trials_comparable():
    base = Params()
    assert study_name(base, "abc.dir", "c1") == study_name(Params(), "abc.dir", "c1")
    assert study_name(base, "abc.dir", "c1") != study_name(base, "def.dir", "c1")
    assert study_name(base, "abc.dir", "c1") != study_name(base, "abc.dir", "c2")  # other code
    wider = parse_params({"tune": {"search_space": {"lr": [0.0001, 0.1]}}})
    assert study_name(wider, "abc.dir", "c1") != study_name(base, "abc.dir", "c1")
    more = parse_params({"tune": {"n_trials": 50}})
    assert study_name(more, "abc.dir", "c1") == study_name(base, "abc.dir", "c1")  # resume


def test_the_code_hash_follows_the_code_the_tune_stage_depends_on(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    project = tmp_path / "dvc.yaml"
    before = code_hash(project)
    assert before == code_hash(ROOT / "dvc.yaml") == code_hash()  # the same code elsewhere
    # Byte code, and code tune does not depend on, change nothing.
    (tmp_path / "pipeline/models/__pycache__").mkdir(exist_ok=True)
    (tmp_path / "pipeline/models/__pycache__/cnn.cpython-311.pyc").write_bytes(b"byte code")
    with open(tmp_path / "pipeline/server.py", "a") as server:
        server.write("# not imported by the tune stage\n")
    assert code_hash(project) == before
    for module in ("pipeline/models/cnn.py", "pipeline/training.py"):
        with open(tmp_path / module, "a") as code:
            code.write("# changed\n")
        assert code_hash(project) != before
        before = code_hash(project)
    # No dvc.yaml beside the package: all of the package, server.py included.
    project.unlink()
    whole = code_hash(project)
    with open(tmp_path / "pipeline/server.py", "a") as server:
        server.write("# changed\n")
    assert code_hash(project) != whole


def test_model_name_is_a_tuning_dimension_when_the_search_space_lists_it():
    from optuna.trial import FixedTrial

    params = parse_params({"tune": {"search_space": {"model": ["cnn", "mlp"]}}})
    values = {"train.lr": 0.01, "train.batch_size": 32, "model.channels": 16}
    values |= {"model.dropout": 0.1, "train.weight_decay": 1e-5, "train.optimizer": "sgd"}
    values |= {"model.name": "mlp"}
    hp, model = suggest(FixedTrial(values), params.tune, params.train, params.model)
    assert (model.name, model.channels, model.dropout) == ("mlp", 16, 0.1)
    assert (hp.lr, hp.batch_size, hp.max_epochs) == (0.01, 32, params.tune.epochs)
    without = parse_params({})
    _, model = suggest(FixedTrial(values), without.tune, without.train, without.model)
    assert model.name == "cnn"  # not in the search space: params.yaml's model.name


# --- Sessions of the stage's own study, with a cheap objective instead of training ---------


def _params(tune: dict) -> Params:
    return parse_params({"tune": {"pruner": "none", **tune}})


def _objective(params: Params, stop_at: int | None = None):
    """A deterministic stand-in for a training run; ^C (KeyboardInterrupt) at trial stop_at."""

    def objective(trial):
        hp, model = suggest(trial, params.tune, params.train, params.model)
        if trial.number == stop_at:
            raise KeyboardInterrupt
        return (math.log10(hp.lr) + 2.5) ** 2 + hp.batch_size / 1000 + model.dropout

    return objective


def _session(storage: str, tune: dict, stop_at: int | None = None):
    """What the stage does with its study: open (or resume) it, then run the trials due."""
    params = _params(tune)
    study, todo = open_study(params, "study", storage)
    optimize(study, _objective(params, stop_at), todo)
    return study


def _killed_mid_trial(storage: str, tune: dict) -> None:
    """A stage process killed while a trial trains: the trial stays RUNNING in the study."""
    params = _params(tune)
    study, _ = open_study(params, "study", storage)
    trial = study.ask()
    suggest(trial, params.tune, params.train, params.model)


def _completed(study) -> list[tuple]:
    from optuna.trial import TrialState

    trials = study.get_trials(states=(TrialState.COMPLETE,))
    return [tuple(sorted(t.params.items())) for t in trials]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_extending_a_finished_study_draws_new_parameters(tmp_path, sampler, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    _session(storage, {"sampler": sampler, "n_trials": 3})
    study = _session(storage, {"sampler": sampler, "n_trials": 6})
    assert "3 trial(s) already done; running 3 more" in capsys.readouterr().out
    done = _completed(study)
    assert len(done) == 6 and len(set(done)) == 6, done
    pairs = {(dict(p)["train.lr"], dict(p)["train.batch_size"]) for p in done}
    assert len(pairs) == 6  # the issue: the same (lr, batch_size) pairs twice
    # Seeded: the same steps draw the same parameters.
    again = f"sqlite:///{tmp_path}/again.db"
    _session(again, {"sampler": sampler, "n_trials": 3})
    assert _completed(_session(again, {"sampler": sampler, "n_trials": 6})) == done


@pytest.mark.parametrize("how", ["killed", "ctrl-c"])
@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_an_interrupted_study_resumes_without_repeating(tmp_path, sampler, how, capsys, caplog):
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{tmp_path}/optuna.db"
    tune = {"sampler": sampler, "n_trials": 6}
    if how == "killed":
        _session(storage, {**tune, "n_trials": 3})
        _killed_mid_trial(storage, tune)
    else:
        optuna.logging.enable_propagation()  # Optuna's records, to caplog
        try:
            with pytest.raises(KeyboardInterrupt):
                _session(storage, tune, stop_at=3)
        finally:
            optuna.logging.disable_propagation()
        # The stage's one line says it was interrupted: Optuna logs no failed trial (and
        # no traceback) for it.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    capsys.readouterr()
    study = _session(storage, tune)
    out = capsys.readouterr().out
    marked = ", 1 interrupted trial(s) marked failed" if how == "killed" else ""
    assert f"3 trial(s) already done{marked}; running 3 more" in out
    assert "queued again with the same parameters: interrupted trial(s) 3" in out
    trials = study.trials
    assert trials[3].state == TrialState.FAIL
    assert trials[4].params == trials[3].params  # the interrupted trial, run again
    assert trials[4].user_attrs["retry_of"] == 3
    done = _completed(study)
    assert len(done) == 6 and len(set(done)) == 6, done
    assert "running 0 more" in (_session(storage, tune), capsys.readouterr().out)[1]


def test_interrupted_trials_are_marked_failed_through_the_public_api(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from pipeline.stages import tune
    from pipeline.stages.tune import requeue_interrupted

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # left RUNNING
    study.tell(study.ask(), 1.0)
    reloaded = optuna.load_study(study_name="s", storage=storage)
    assert requeue_interrupted(reloaded) == (1, [0])
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    assert trials[2].params == trials[0].params
    assert requeue_interrupted(reloaded) == (0, [])  # queued once
    source = Path(tune.__file__).read_text()
    for private in ("._storage", "._trial_id", "._study_id", "set_trial_state_values"):
        assert private not in source


# --- Grid search -----------------------------------------------------------------------------

GRID = {
    "lr": [0.001, 0.003, 0.01],  # three values: a float key still takes every grid point
    "batch_size": [32, 64],
    "channels": [16],
    "dropout": [0.1],
    "weight_decay": [0.0001],
    "optimizer": ["adam"],
}
GRID_POINTS = {(lr, bs) for lr in GRID["lr"] for bs in GRID["batch_size"]}


def _points(study) -> list[tuple]:
    return [(dict(p)["train.lr"], dict(p)["train.batch_size"]) for p in _completed(study)]


def test_grid_search_runs_each_point_once_and_then_is_done(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    tune = {"sampler": "grid", "search_space": GRID}
    study = _session(storage, {**tune, "n_trials": 4})
    assert "running 4 more (grid sampler over 6 point(s), 0 tried" in capsys.readouterr().out
    first = _points(study)
    assert len(set(first)) == 4 and set(first) <= GRID_POINTS
    study = _session(storage, {**tune, "n_trials": 20})  # more trials than points
    assert "4 trial(s) already done; running 2 more (grid sampler over 6 point(s), 4 tried" in (
        capsys.readouterr().out
    )
    assert sorted(_points(study)) == sorted(GRID_POINTS)
    trials = study.trials
    keys = ("model.channels", "model.dropout", "train.optimizer")
    assert {tuple(t.params[k] for k in keys) for t in trials} == {(16, 0.1, "adam")}
    _session(storage, {**tune, "n_trials": 20})
    assert "6 trial(s) already done; running 0 more" in capsys.readouterr().out


def test_grid_point_of_an_interrupted_trial_is_run_again(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    tune = {"sampler": "grid", "search_space": GRID, "n_trials": 6}
    _session(storage, {**tune, "n_trials": 2})
    _killed_mid_trial(storage, tune)
    study = _session(storage, tune)
    out = capsys.readouterr().out
    assert "2 trial(s) already done, 1 interrupted trial(s) marked failed; running 4 more" in out
    assert sorted(_points(study)) == sorted(GRID_POINTS)  # no point lost, none twice
    assert len(study.trials) == 7  # 6 points and the interrupted trial


# --- Plots -----------------------------------------------------------------------------------


def test_plots_are_optunas_and_leave_warnings_and_style_alone(tmp_path):
    import matplotlib
    import optuna

    from pipeline.stages.tune import write_plots

    study = optuna.create_study(direction="minimize")
    for number in range(4):
        trial = study.ask()
        for epoch in range(3):
            trial.report(1.0 / (number + epoch + 1), epoch)
        if number == 2:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 1.0 / (number + 1))
    matplotlib.use("Agg")  # as the stage does
    filters, style = list(warnings.filters), dict(matplotlib.rcParams)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_plots(study, "val/loss", tmp_path)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert warnings.filters == filters
    assert dict(matplotlib.rcParams) == style  # Optuna's plots switch to ggplot: scoped
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    assert not list(tmp_path.glob("*.tmp"))


def test_no_trials_still_writes_the_declared_history_plot(tmp_path, monkeypatch):
    from pipeline.stages import tune

    (tmp_path / "params.yaml").write_text("tune:\n  n_trials: 0\n")
    monkeypatch.chdir(tmp_path)
    tune.main([])
    report = tmp_path / tune.REPORT_DIR
    assert (report / "optimization_history.png").read_bytes().startswith(PNG)
    assert (report / "best_params.json").read_text().strip() == "{}"
    assert sorted(p.name for p in report.iterdir()) == [
        "best_params.json",
        "optimization_history.png",
        "trials.csv",
    ]


# --- The stage in process: real (tiny) trainings --------------------------------------------


def test_tune_prints_and_tags_its_device_and_writes_its_reports(
    mlflow_store, digits_prepared, monkeypatch, capsys
):
    import json

    import mlflow

    from pipeline import device, tracking
    from pipeline.data import loader
    from pipeline.stages import tune

    monkeypatch.setattr(loader, "load_prepared", lambda **_: digits_prepared)
    monkeypatch.setattr(tracking, "dvc_hash", lambda _: "digits.dir")
    space = {**GRID, "lr": [0.003, 0.01], "batch_size": [64], "channels": [8]}
    params = parse_params(
        {"tune": {"n_trials": 5, "epochs": 1, "sampler": "grid", "search_space": space}}
    )
    out = mlflow_store / "reports"
    out.mkdir()
    best = tune.tune(params, out)
    stdout = capsys.readouterr().out
    expected = device.describe(device.resolve(params.train.accelerator))
    assert stdout.count("[tune] device ") == 1 and f"[tune] device {expected}\n" in stdout
    assert "running 2 more (grid sampler over 2 point(s), 0 tried" in stdout
    assert "trials {'complete': 2, 'pruned': 0, 'fail': 0}" in stdout
    assert json.loads((out / "best_params.json").read_text()) == best
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert (out / name).read_bytes().startswith(PNG)
    parent = mlflow.search_runs(
        experiment_names=[params.mlflow.experiment],
        filter_string="tags.mlflow.parentRunId IS NULL",
        output_format="list",
    )
    assert [run.data.tags["device"] for run in parent] == [expected]


def test_trials_train_and_are_judged_on_tune_samples_of_the_splits(
    mlflow_store, digits_prepared, monkeypatch, capsys
):
    import mlflow
    import torch

    from pipeline import tracking
    from pipeline.data import loader
    from pipeline.stages import tune

    monkeypatch.setattr(loader, "load_prepared", lambda **_: digits_prepared)
    monkeypatch.setattr(tracking, "dvc_hash", lambda _: "digits.dir")
    space = {**GRID, "lr": [0.003], "batch_size": [64], "channels": [8]}
    tune_section = {"n_trials": 1, "epochs": 1, "sampler": "grid", "search_space": space}
    params = parse_params({"tune": {**tune_section, "train_samples": 300, "val_samples": 100}})
    (mlflow_store / "reports").mkdir()
    tune.tune(params, mlflow_store / "reports")
    stdout = capsys.readouterr().out
    assert "[tune] trials train on 300 of the 1252 train samples (tune.train_samples)" in stdout
    assert "[tune] trials are judged on 100 of the 277 val samples (tune.val_samples)" in stdout
    assert len(digits_prepared.tables["train"]) == 1252  # the data itself is not cut
    # What the trials get: the same rows in the table and the tensors, every run alike.
    cut = tune.prepare(params)
    for split, n in (("train", 300), ("val", 100)):
        x, y = cut.tensors[split]
        table = cut.tables[split]
        assert (len(x), len(y), len(table)) == (n, n, n)
        keep = tune.subset(len(digits_prepared.tables[split]), n, params.tune.seed)
        assert torch.equal(x, digits_prepared.tensors[split][0][keep])
        whole = digits_prepared.tables[split][["sample_id", "label"]]  # no features: tensors
        assert table.equals(whole.iloc[keep.numpy()].reset_index(drop=True))
    assert torch.equal(tune.prepare(params).tensors["val"][1], cut.tensors["val"][1])
    (parent,) = mlflow.search_runs(
        experiment_names=[params.mlflow.experiment],
        filter_string="tags.mlflow.parentRunId IS NULL",
        output_format="list",
    )
    assert parent.data.params["tune.train_samples"] == "300"
    assert parent.data.params["tune.val_samples"] == "100"
    # The default (10,000) keeps every one of the digits: no line.
    assert tune.subset(1252, 10_000, 42) is None
    assert tune.subset(1252, None, 42) is None


def test_the_training_subset_is_the_same_for_every_worker_and_sorted():
    from pipeline.stages.tune import subset

    first = subset(1000, 100, seed=7)
    assert first.tolist() == subset(1000, 100, seed=7).tolist()
    assert first.tolist() == sorted(set(first.tolist())) and len(first) == 100
    assert first.tolist() != subset(1000, 100, seed=8).tolist()
    assert first.min() >= 0 and first.max() < 1000


def _prune_first_trial():
    """A pruner that prunes trial 0 at its second (last) epoch, step 1, and no other trial."""
    import optuna

    class PruneFirstTrial(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.number == 0 and trial.last_step == 1

    return PruneFirstTrial()


def test_trial_runs_say_study_and_state_and_a_pruned_trial_is_not_a_failed_run(
    mlflow_store, digits_prepared, monkeypatch, capsys
):
    import mlflow

    from pipeline import tracking, training
    from pipeline.data import loader
    from pipeline.stages import tune

    monkeypatch.setattr(loader, "load_prepared", lambda **_: digits_prepared)
    monkeypatch.setattr(tracking, "dvc_hash", lambda _: "digits.dir")
    monkeypatch.setattr(tune, "_pruner", lambda _: _prune_first_trial())
    fit, calls = training.fit, []

    def crashing_third(*args, **kwargs):  # trial 2's training raises
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", crashing_third)
    space = {**GRID, "batch_size": [64], "channels": [8]}  # three points
    params = parse_params(
        {"tune": {"n_trials": 3, "epochs": 2, "sampler": "grid", "search_space": space}}
    )
    out = mlflow_store / "reports"
    out.mkdir()
    tune.tune(params, out)
    assert "trials {'complete': 1, 'pruned': 1, 'fail': 1}" in capsys.readouterr().out

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    name = parent.data.tags["optuna.study"]
    assert parent.info.run_name == f"tune · {name}"
    trials = {int(r.data.tags["optuna.trial"]): r for r in runs if r is not parent}
    assert all(r.data.tags["mlflow.runName"] == r.info.run_name for r in runs)  # the UI's name
    expected = {0: ("PRUNED", "FINISHED"), 1: ("COMPLETE", "FINISHED"), 2: ("FAIL", "FAILED")}
    assert {
        n: (r.info.run_name, r.data.tags["optuna.trial_state"], r.info.status)
        for n, r in trials.items()
    } == {
        n: (f"{name} · trial {n} · {state}", state, status)
        for n, (state, status) in expected.items()
    }

    import optuna

    study = optuna.load_study(study_name=name, storage=tune.study_storage())
    for number in (0, 1):  # every epoch trained, the one that pruned trial 0 included
        history = client.get_metric_history(trials[number].info.run_id, params.tune.metric)
        logged = {m.step: m.value for m in history}
        assert logged == study.trials[number].intermediate_values
    assert sorted(study.trials[0].intermediate_values) == [0, 1]


def test_a_study_database_url_is_never_written_in_params():
    from pipeline.config import ParamsError

    with pytest.raises(ParamsError) as raised:
        parse_params({"tune": {"storage": "postgresql+psycopg://runway:s3cret@db:5432/optuna"}})
    assert str(raised.value) == (
        "params.yaml: tune.storage: postgresql+psycopg://...: expected local or the name of an "
        "environment variable holding the study database's URL (e.g. OPTUNA_STORAGE), so that "
        "no password is written in params.yaml"
    )
    assert "s3cret" not in str(raised.value)


def test_a_shared_study_database_that_is_unset_or_unreachable_is_named(monkeypatch, tmp_path):
    from pipeline.io import StageError
    from pipeline.stages.tune import make_storage, shared

    tune = parse_params({"tune": {"storage": "TEAM_STUDIES"}}).tune
    assert shared(tune) and shared(parse_params({"tune": {"workers": 2}}).tune)
    assert not shared(parse_params({}).tune)
    monkeypatch.delenv("TEAM_STUDIES", raising=False)
    with pytest.raises(StageError, match="the environment variable TEAM_STUDIES is not set"):
        make_storage(tune)
    from tests.ui import free_port

    port = free_port()  # nothing listens there
    monkeypatch.setenv("TEAM_STUDIES", f"postgresql+psycopg://runway:s3cret@127.0.0.1:{port}/x")
    with pytest.raises(StageError) as raised:
        make_storage(tune)
    message = str(raised.value)
    assert message.startswith(
        f"tune.storage: cannot open the study database "
        f"postgresql+psycopg://runway:***@127.0.0.1:{port}/x: connection failed"
    )
    assert "s3cret" not in message and "\n" not in message


def test_the_workers_lock_names_an_unreachable_database_and_warns_where_it_has_none(capsys):
    from pipeline.io import StageError
    from pipeline.stages.tune import TrialLock
    from tests.ui import free_port

    port = free_port()  # nothing listens there
    with TrialLock(f"postgresql+psycopg://runway:s3cret@127.0.0.1:{port}/x", "s") as lock:
        with pytest.raises(StageError) as raised:
            lock.acquire()
        assert not lock.held
    message = str(raised.value)
    assert message.startswith(
        f"tune.storage: cannot lock the study database "
        f"postgresql+psycopg://runway:***@127.0.0.1:{port}/x: connection failed"
    )
    assert "s3cret" not in message and "\n" not in message
    assert capsys.readouterr().out == ""

    with TrialLock("mysql+pymysql://runway:s3cret@127.0.0.1/x", "s", "[tune worker 1]") as lock:
        lock.acquire()
        assert lock.held
        lock.release()
        assert not lock.held
    assert capsys.readouterr().out == (
        "[tune worker 1] the study database (mysql) has no lock the workers share: the study "
        "may end with a trial or two more than tune.n_trials\n"
    )


def test_the_cut_of_memory_mapped_splits_stays_memory_mapped(
    digits_prepared, tmp_path, monkeypatch
):
    """Splits too large for memory are memory-mapped; so is the part of them the trials
    train and are judged on (it may be large too: tune.train_samples is any number), from a
    file beside the split's copy that every worker maps and the first one makes. The trials
    get the same samples as from splits in memory."""
    import torch

    from pipeline.data.table import PREPARED_DIR
    from pipeline.io import write_json
    from pipeline.stages import tune

    def mapping(tensor) -> str:
        """The file (if any) mapped where ``tensor``'s data lies (Linux's /proc/self/maps)."""
        for line in Path("/proc/self/maps").read_text().splitlines():
            span, _, _, _, _, *path = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in span.split("-"))
            if start <= tensor.data_ptr() < end:
                return path[0] if path else ""
        raise AssertionError("not in any mapping")

    monkeypatch.chdir(tmp_path)
    PREPARED_DIR.mkdir(parents=True)
    for split in ("train", "val"):
        digits_prepared.tables[split].to_parquet(PREPARED_DIR / f"{split}.parquet", index=False)
    write_json(PREPARED_DIR / "manifest.json", digits_prepared.manifest.to_dict())

    def cut(placement: str, train_samples: int = 300):
        return tune.prepare(
            parse_params(
                {
                    "train": {"data_placement": placement},
                    "tune": {"train_samples": train_samples, "val_samples": 100},
                }
            )
        )

    cuts = {placement: cut(placement) for placement in ("host", "disk")}
    assert (cuts["host"].storage, cuts["disk"].storage) == ("memory", "disk")
    files = {}
    for split, n in (("train", 300), ("val", 100)):
        (x, y), (mapped_x, mapped_y) = (cuts[p].tensors[split] for p in ("host", "disk"))
        assert len(mapped_x) == n
        assert torch.equal(mapped_x, x) and torch.equal(mapped_y, y)
        assert not mapping(x).startswith("/")  # the heap or anonymous memory, not a file
        files[split] = Path(mapping(mapped_x))
        assert files[split] == cuts["disk"].copies[split]
        assert files[split].parent == tmp_path / ".runway/prepared"
        assert re.fullmatch(rf"{split}-[0-9a-f]{{16}}-rows-[0-9a-f]{{16}}\.npy", files[split].name)
        assert cuts["disk"].tables[split].equals(cuts["host"].tables[split])
    made = {split: file.stat().st_mtime_ns for split, file in files.items()}
    # Another worker maps the same files, made once; another cut replaces the split's file.
    other = cut("disk")
    for split, file in files.items():
        assert mapping(other.tensors[split][0]) == str(file) == str(other.copies[split])
        assert file.stat().st_mtime_ns == made[split]
    fewer = cut("disk", train_samples=200)
    assert torch.equal(
        fewer.tensors["train"][0], cut("host", train_samples=200).tensors["train"][0]
    )
    assert not files["train"].exists() and files["val"].exists()
    assert len(list(files["train"].parent.glob("train-*-rows-*.npy"))) == 1
    # A run that cuts the train split no more leaves none of its cuts on disk.
    whole = cut("disk", train_samples=None)
    assert re.fullmatch(r"train-[0-9a-f]{16}\.npy", whole.copies["train"].name)
    assert not list(files["train"].parent.glob("train-*-rows-*.npy"))
    assert list(files["val"].parent.glob("val-*-rows-*.npy")) == [files["val"]]
    # A late worker: a load of a newer version of the split removed the copy it mapped
    # before it cut it. It cuts what it mapped.
    from pipeline.data import loader

    load_prepared = loader.load_prepared

    def load_then_lose(*args, **kwargs):
        data = load_prepared(*args, **kwargs)
        for copy in data.copies.values():
            copy.unlink()
        return data

    monkeypatch.setattr(loader, "load_prepared", load_then_lose)
    late = cut("disk", train_samples=250)
    monkeypatch.setattr(loader, "load_prepared", load_prepared)
    for split in ("train", "val"):
        assert torch.equal(late.tensors[split][0], cut("host", train_samples=250).tensors[split][0])


def test_trials_validate_within_epochs_and_can_be_pruned_inside_their_first(
    mlflow_store, digits_prepared, monkeypatch, capsys
):
    """tune.val_check_interval: 0.25 validates a trial four times an epoch, the last at its
    end, each check a step the pruner sees and the trial's run logs. Batch 64 (20 batches
    an epoch) checks every 5 batches, steps 0-3 in epoch 1 and 4-7 in epoch 2; a pruner
    that stops it at step 2 stops it three quarters through its first epoch. Batches 256
    (5 an epoch) and 512 (3) check after each; step j is the first check that has trained at
    least the (j + 1)-th quarter: 256 reports after batches 2-5 of each epoch, 512 after
    batches 1, 2 and 3 as steps 0, 1 and 3."""
    import mlflow
    import optuna

    from pipeline import tracking
    from pipeline.config import TuneParams
    from pipeline.data import loader
    from pipeline.stages import tune
    from pipeline.training import check_schedule

    class PruneBatch64AtStep2(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.params["train.batch_size"] == 64 and trial.last_step == 2

    monkeypatch.setattr(loader, "load_prepared", lambda **_: digits_prepared)
    monkeypatch.setattr(tracking, "dvc_hash", lambda _: "digits.dir")
    monkeypatch.setattr(tune, "_pruner", lambda _: PruneBatch64AtStep2())
    space = {**GRID, "lr": [0.01], "batch_size": [64, 256, 512], "channels": [8]}
    section = {"n_trials": 3, "epochs": 2, "sampler": "grid", "search_space": space}
    params = parse_params({"tune": {**section, "val_check_interval": 0.25}})
    out = mlflow_store / "reports"
    out.mkdir()
    tune.tune(params, out)
    lines = capsys.readouterr().out

    name = study_name(params, "digits.dir", code_hash())
    study = optuna.load_study(study_name=name, storage=tune.study_storage())
    trials = {t.params["train.batch_size"]: t for t in study.trials}
    assert trials[64].state == optuna.trial.TrialState.PRUNED
    assert sorted(trials[64].intermediate_values) == [0, 1, 2]
    assert trials[256].state == trials[512].state == optuna.trial.TrialState.COMPLETE
    assert sorted(trials[256].intermediate_values) == list(range(8))
    assert sorted(trials[512].intermediate_values) == [0, 1, 3, 4, 5, 7]
    assert len(set(trials[512].intermediate_values.values())) == 6  # each after more training
    assert f"trial {trials[64].number}: PRUNED   after 3 check(s)" in lines
    assert f"trial {trials[256].number}: COMPLETE after 8 check(s)" in lines
    assert f"trial {trials[512].number}: COMPLETE after 6 check(s)" in lines
    # A trial's value is the best reported check (batch 256 validated 10 times, reported 8):
    # an unreported one, which its run never logged, is not it.
    for size in (256, 512):
        assert trials[size].value == min(trials[size].intermediate_values.values())
    history = [{"val/loss": 0.1, "val/acc": 0.99}, {"val/loss": 0.3, "val/acc": 0.9}]
    history += [{"val/loss": 0.2, "val/acc": 0.95}]
    assert tune.trial_value("val/loss", [None, 0, 1], history) == 0.2
    assert tune.trial_value("val/acc", [None, 0, 1], history) == 0.95
    assert tune.trial_value("val/loss", [None, None, None], history) is None
    client = mlflow.MlflowClient()
    for trial in trials.values():
        run_id = trial.user_attrs[tune.TRIAL_RUN]
        logged = client.get_metric_history(run_id, "val/loss")
        assert {m.step: m.value for m in logged} == trial.intermediate_values
    # The checks: every batches // 4, the epoch cut to 4 times that; each batch below 8.
    assert check_schedule(20, 4) == {"val_check_interval": 5, "limit_train_batches": 20}
    assert check_schedule(14, 4) == {"val_check_interval": 3, "limit_train_batches": 12}
    assert check_schedule(8, 4) == {"val_check_interval": 2, "limit_train_batches": 8}
    assert check_schedule(7, 4) == {"val_check_interval": 1}
    assert check_schedule(3, 4) == {"val_check_interval": 1}
    assert check_schedule(3, 1) == {}
    # The pruners' budgets are checks: Hyperband's largest is a whole trial's.
    assert tune.checks(TuneParams(epochs=10, val_check_interval=0.25)) == 40
    assert tune.checks(TuneParams(epochs=10, val_check_interval=0.2)) == 50
    assert tune.checks(TuneParams(epochs=10)) == 10
