"""A moved or copied project logs to its own MLflow store and artifacts; a queued DVC
experiment logs to the project's store, not to its temporary copy's."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline import tracking
from tests.conftest import TINY, copy_project, edit_params, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("store_location")]

FAST = {**TINY, "tune": {"n_trials": 0}, "train": {"max_epochs": 1, "patience": 1}}


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A project after a full (tiny) `dvc repro`: runs, a champion, artifacts."""
    project = copy_project(tmp_path_factory.mktemp("store") / "original")
    edit_params(project, FAST)
    run(["dvc", "repro"], project)
    return project


def rows(project: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{project}/mlruns/mlflow.db?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*"))


def mentions(project: Path, prefix: str) -> list[str]:
    """Every table.column of the store holding a value that starts with ``prefix``."""
    found = []
    for (table,) in rows(project, "SELECT name FROM sqlite_master WHERE type = 'table'"):
        for column in [r[1] for r in rows(project, f"PRAGMA table_info({table})")]:
            hit = rows(
                project,
                f"SELECT count(*) FROM {table} WHERE substr(CAST({column} AS TEXT), 1, "
                f"{len(prefix)}) = '{prefix}'",
            )
            if hit[0][0]:
                found.append(f"{table}.{column}")
    return found


def counted(project: Path) -> str:
    n = {
        table: rows(project, f"SELECT count(*) FROM {table}")[0][0]
        for table in ("experiments", "runs", "model_versions", "logged_models")
    }
    n["experiments"] -= 1  # Default: its location is not under a project's mlruns/artifacts
    words = {
        "experiments": "experiment",
        "runs": "run",
        "model_versions": "model version",
        "logged_models": "logged model",
    }
    return ", ".join(f"{n[t]} {w}{'' if n[t] == 1 else 's'}" for t, w in words.items() if n[t])


@contextmanager
def gone(project: Path):
    """``project`` is not there (deleted or moved away) while the block runs."""
    away = project.with_name(project.name + ".away")
    project.rename(away)
    try:
        yield
    finally:
        shutil.rmtree(project, ignore_errors=True)  # anything written there meanwhile
        away.rename(project)


def test_copied_project_logs_its_runs_to_its_own_artifacts(original, tmp_path):
    before = tree(original / "mlruns" / "artifacts")
    copy = Path(shutil.copytree(original, tmp_path / "copy", symlinks=True))
    what = counted(copy)
    done = run(["dvc", "repro", "-f", "-s", "train"], copy)
    assert (
        f"mlruns/mlflow.db pointed at the artifacts of {original} (the project was moved or "
        f"copied): its paths now point at {copy}/mlruns/artifacts ({what})"
    ) in done.stderr.splitlines()
    [(uri,)] = rows(copy, "SELECT artifact_uri FROM runs ORDER BY start_time DESC LIMIT 1")
    assert uri.startswith(f"{(copy / 'mlruns' / 'artifacts').as_uri()}/")
    assert Path(uri.removeprefix("file://")).is_dir()  # the new model's files are there
    assert tree(original / "mlruns" / "artifacts") == before
    assert mentions(copy, f"{original.as_uri()}/mlruns/") == []
    assert mentions(copy, f"{original}/mlruns/") == []
    # once pointed here, the next stage says nothing more
    again = run(["dvc", "repro", "-f", "-s", "params"], copy)
    assert "pointed at the artifacts" not in again.stderr


def test_moved_project_relocates_and_its_champion_loads(original, tmp_path, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from pipeline.cli import app

    moved = Path(shutil.copytree(original, tmp_path / "moved", symlinks=True))
    what = counted(moved)
    store = moved / "mlruns" / "mlflow.db"
    monkeypatch.chdir(moved / "pipeline")  # from any folder of the project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with gone(original):
        dry = CliRunner().invoke(app, ["store", "relocate", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert dry.output == (
            f"{store} pointed at the artifacts of {original} (the project was moved or copied):"
            f" its paths would point at {moved}/mlruns/artifacts ({what})\n"
        )
        done = CliRunner().invoke(app, ["store", "relocate"])
        assert done.output == dry.output.replace("would point", "now point")
        again = CliRunner().invoke(app, ["store", "relocate"])
        assert again.output == (
            f"{store} already points at this project's artifacts: nothing to do\n"
        )
        assert mentions(moved, f"{original.as_uri()}/mlruns/") == []
        [(version,)] = rows(moved, "SELECT DISTINCT version FROM registered_model_aliases")
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(f"sqlite:///{store}")
        try:
            for uri in ("models:/digits-cnn@champion", f"models:/digits-cnn/{version}"):
                model = mlflow.pytorch.load_model(uri)
                assert model is not None
        finally:
            mlflow.set_tracking_uri(previous)
        assert not original.exists()  # nothing was written to the old place


def test_copy_without_its_artifacts_is_refused(original, tmp_path):
    copy = Path(
        shutil.copytree(
            original,
            tmp_path / "bare",
            symlinks=True,
            ignore=lambda folder, names: ["artifacts"] if folder.endswith("mlruns") else [],
        )
    )
    stored = rows(copy, "SELECT run_uuid, artifact_uri FROM runs")
    artifacts = original / "mlruns" / "artifacts"
    # the folder itself (the experiment's location), each run's files, each model's files
    lost = [artifacts] + [d / "artifacts" for d in artifacts.iterdir() if d.name != "models"]
    lost += [d / "artifacts" for d in (artifacts / "models").iterdir()]
    done = run(["dvc", "repro", "-f", "-s", "train"], copy, check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors[0] == (
        f"[train] error: mlruns/mlflow.db keeps its artifacts in {artifacts}, not in this "
        f"project's {copy}/mlruns/artifacts, and {len(lost)} of them are not here "
        f"(mlruns/artifacts): copy them (`cp -a {artifacts}/. "
        f"{copy}/mlruns/artifacts/`) and run again; or move the store aside "
        "(`mv mlruns mlruns.old`) to start a new one"
    )
    assert rows(copy, "SELECT run_uuid, artifact_uri FROM runs") == stored
    assert not (copy / "mlruns" / "artifacts").exists()


def test_queued_experiment_logs_to_the_original_store(tmp_path, monkeypatch):
    """The folder layout `dvc exp run --queue` makes (`dvc queue start` runs each experiment
    in `<repo>/.dvc/tmp/exps/tmpXXXXXXXX/`, with DVC_ROOT=<repo>)."""
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpk2n4x8qa"
    (copy / "pipeline").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.experiment_root(copy) == repo.resolve()
    assert tracking.experiment_root(copy / "pipeline") == repo.resolve()
    assert tracking.store_dir(copy) == repo.resolve() / "mlruns"
    assert tracking.experiment_root(repo) is None  # `dvc repro` in the repo itself
    assert tracking.store_dir(repo) == Path("mlruns")
    monkeypatch.chdir(copy)
    assert tracking.tracking_uri() == f"sqlite:///{repo.resolve()}/mlruns/mlflow.db"
    assert (repo / "mlruns").is_dir() and not (copy / "mlruns").exists()
    # no DVC_ROOT (a stage started by hand in the copy), or one of another repository: the
    # layout decides
    monkeypatch.delenv("DVC_ROOT")
    assert tracking.experiment_root(copy) == repo.resolve()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert tracking.experiment_root(copy) == repo.resolve()
    # a DVC_ROOT left in the environment changes nothing outside a temporary copy
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking.experiment_root(tmp_path) is None
