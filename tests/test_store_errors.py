"""An MLflow sqlite store that another process holds locked, or that is not a readable sqlite
file, stops a stage with one line naming the file and what to do: through `dvc repro`, in a
run already logging, and for a run id the store does not have."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.io import StageError
from tests.conftest import copy_project, new_store, run

pytestmark = pytest.mark.xdist_group("store_errors")

STORE = "mlruns/mlflow.db"
LOCKED = (
    "mlruns/mlflow.db is locked by another process (waited {s} s; RUNWAY_MLFLOW_LOCK_TIMEOUT "
    "sets the wait): let that process finish or stop it (`lsof mlruns/mlflow.db` names it), "
    "then run again"
)
BROKEN = (
    "mlruns/mlflow.db is not a readable MLflow store ({why}): move it aside "
    "(`mv mlruns/mlflow.db mlruns/mlflow.db.broken`) and run again; a new empty store is made, "
    "the artifacts under mlruns/artifacts/ stay, and `dvc repro` logs only the stages it "
    "reruns (`dvc repro -f` runs and logs them all)"
)

HOLD = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


class Holder:
    """A second process holding ``BEGIN EXCLUSIVE`` on a sqlite file for ``seconds``."""

    def __init__(self, db: Path, seconds: float):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(db), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "locked"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "] error: " in line]


# ------------------------------------------------------------------------------ in process


def test_a_lock_released_within_the_timeout_is_waited_for(tmp_path):
    db = new_store(tmp_path / "mlruns")
    uri = f"sqlite:///{db}"
    with Holder(db, 3):
        with pytest.raises(StageError) as refused:
            tracking.check_store(uri, timeout=0.5)
        assert str(refused.value) == LOCKED.replace("mlruns/mlflow.db", str(db)).format(s=0.5)
        start = time.monotonic()
        tracking.check_store(uri, timeout=60)  # returns once the holder lets go
        waited = time.monotonic() - start
    assert 1 < waited < 30


@pytest.mark.parametrize(
    "raw, message",
    [
        ("soon", "RUNWAY_MLFLOW_LOCK_TIMEOUT='soon': expected a number of seconds >= 0 "),
        ("-1", "RUNWAY_MLFLOW_LOCK_TIMEOUT='-1': expected a number of seconds >= 0 "),
        ("nan", "RUNWAY_MLFLOW_LOCK_TIMEOUT='nan': expected a number of seconds >= 0 "),
    ],
)
def test_a_bad_lock_timeout_is_refused(monkeypatch, raw, message):
    monkeypatch.setenv("RUNWAY_MLFLOW_LOCK_TIMEOUT", raw)
    with pytest.raises(StageError) as refused:
        tracking.lock_timeout()
    assert str(refused.value) == message + "(unset: 60)"


def test_the_lock_timeout_defaults_to_a_minute(monkeypatch):
    monkeypatch.delenv("RUNWAY_MLFLOW_LOCK_TIMEOUT", raising=False)
    assert tracking.lock_timeout() == 60
    monkeypatch.setenv("RUNWAY_MLFLOW_LOCK_TIMEOUT", "2.5")
    assert tracking.lock_timeout() == 2.5


def test_a_run_id_the_store_does_not_have(mlflow_store):
    import mlflow

    experiment = tracking.setup("runway-test")
    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(StageError) as refused, tracking.run(experiment, "t", {}, run_id=missing):
        pass
    assert str(refused.value) == (
        "MLflow run 0123456789abcdef0123456789abcdef is not in mlruns/mlflow.db (the store was "
        "replaced, or the run was logged to another one): `dvc repro -f` runs every stage again "
        "and logs new runs"
    )
    assert mlflow.active_run() is None


MID_RUN = """
import subprocess, sys
import mlflow
from pipeline import tracking
from pipeline.io import run_stage

def main():
    experiment = tracking.setup("runway-test")
    with tracking.run(experiment, "train", {}) as active:
        print(active.info.run_id, flush=True)
        holder = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "300"],
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        try:
            mlflow.log_param("a", 1)
        finally:
            holder.kill()
            holder.wait()

run_stage("train", main)
"""


@pytest.mark.slow
def test_a_lock_taken_while_a_run_logs_ends_the_run_failed_with_one_line(mlflow_store):
    """MLflow waits its own 20 s for each statement; then one line, and the run ends FAILED."""
    from mlflow.tracking import MlflowClient

    db = mlflow_store / STORE
    result = run([sys.executable, "-c", MID_RUN, HOLD, str(db)], mlflow_store, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "[train] error: mlruns/mlflow.db is locked by another process: let that process finish "
        "or stop it (`lsof mlruns/mlflow.db` names it), then run again"
    ]
    run_id = result.stdout.split()[0]
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status == "FAILED"


# ---------------------------------------------------------------------- through dvc repro


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("store-errors"))
    run(["dvc", "repro", "validate"], project)
    return project


def repro_validate(project: Path, **env: str) -> subprocess.CompletedProcess:
    return run(["dvc", "repro", "--force", "--single-item", "validate"], project, False, env)


@pytest.mark.slow
def test_a_store_locked_by_another_process_stops_the_stage_with_one_line(project):
    with Holder(project / STORE, 600):
        start = time.monotonic()
        result = repro_validate(project, RUNWAY_MLFLOW_LOCK_TIMEOUT="2")
        seconds = time.monotonic() - start
    assert result.returncode != 0
    assert error_lines(result) == ["[validate] error: " + LOCKED.format(s=2)]
    assert "Traceback" not in result.stderr and "sqlalchemy" not in result.stderr
    assert seconds < 120  # stage start-up and validation; not MLflow's retries


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda good: Path(good).read_bytes()[:5000], "database disk image is malformed"),
        (lambda good: bytes(range(256)) * 64, "file is not a database"),
    ],
    ids=["truncated", "random-bytes"],
)
def test_a_corrupt_store_stops_the_stage_with_one_line(project, tmp_path, damage, why):
    store = project / STORE
    good = shutil.copy2(store, tmp_path / "mlflow.db")
    try:
        store.write_bytes(damage(good))
        result = repro_validate(project)
        assert result.returncode != 0
        assert error_lines(result) == ["[validate] error: " + BROKEN.format(why=why)]
        assert "Traceback" not in result.stderr
    finally:
        shutil.copy2(good, store)
