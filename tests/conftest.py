"""Shared fixtures: a small canonical table, a manifest, and a copy of the project.

Tests that run `dvc repro` or a stage as a subprocess are marked ``slow``: `make test-fast`
skips them, `make test` (and CI) runs everything.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.table import Manifest, make_table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def tracking_uri_as_the_environment_says():
    """After each test, MLflow's tracking URI is the environment's again: a test that points
    this process at a project's store (``mlflow.set_tracking_uri``) must not send a later
    test on the same worker there, whatever ``MLFLOW_TRACKING_URI`` that test sets."""
    yield
    mlflow = sys.modules.get("mlflow")  # only where a test has imported it
    if mlflow is not None:
        mlflow.set_tracking_uri(None)


@pytest.fixture
def manifest() -> Manifest:
    return Manifest(
        source="digits",
        rows=0,
        checksum="sha256:test",
        classes=list(range(10)),
        image_shape=[1, 8, 8],
        pixel_range=[0.0, 16.0],
        class_names=[str(c) for c in range(10)],
    )


@pytest.fixture(scope="session")
def digits_table():
    from pipeline.data import digits

    return digits.load()["table"]


@pytest.fixture
def small_table():
    rng = np.random.default_rng(0)
    features = rng.integers(0, 17, size=(200, 64)).astype(np.float32)
    return make_table(features, np.arange(200) % 10)


def project_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` with the project's environment (plus ``env``)."""
    environment = project_env() | (env or {})
    result = subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


@functools.cache
def empty_store() -> Path:
    """An empty, fully migrated MLflow sqlite store, made once per test process: creating
    one takes about 10 s of schema migrations, copying it a few milliseconds."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="runway-mlflow-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # gone with the test process
    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def new_store(mlruns: Path) -> Path:
    """A copy of the empty store at ``mlruns/mlflow.db``."""
    mlruns.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(empty_store(), mlruns / "mlflow.db"))


def copy_project(dest: Path) -> Path:
    """The project's source files (not its outputs) in a fresh git repo at ``dest``, with an
    empty MLflow store."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    skip = ("dvc.lock", "reports/")
    for rel in listed:
        if rel.startswith(skip) or not (ROOT / rel).is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    new_store(dest / "mlruns")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def edit_params(project: Path, changes: dict[str, dict]) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


TINY = {
    "tune": {"n_trials": 2, "epochs": 2},
    "train": {"max_epochs": 3, "patience": 2},
}


# Iris from data/external/iris.csv (tests.formats.write_iris_csv) with the mlp, on TINY params:
# the whole pipeline in seconds of training.
IRIS = {
    **TINY,
    "data": {"source": "csv", "path": "data/external/iris.csv", "label_column": "species"},
    "model": {"name": "mlp"},
    "validate": {"min_per_class": 5},
    "register": {"model_name": "iris"},
    "mlflow": {"experiment": "runway-iris"},
}


@pytest.fixture(scope="session")
def digits_prepared(digits_table):
    """The digits, split as the pipeline splits them, as a Prepared bundle."""
    from pipeline.config import SplitParams
    from pipeline.data.loader import Prepared, to_tensors
    from pipeline.validation.split import assign_splits

    splits = assign_splits(digits_table["sample_id"], SplitParams())
    tables = {s: digits_table[splits == s].reset_index(drop=True) for s in ("train", "val", "test")}
    m = Manifest(
        "digits",
        1797,
        "sha256:x",
        list(range(10)),
        [1, 8, 8],
        [0.0, 16.0],
        [str(c) for c in range(10)],
    )
    return Prepared(m, tables, {s: to_tensors(t, [1, 8, 8]) for s, t in tables.items()})


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh local MLflow store: the test runs inside tmp_path with the default URI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    new_store(tmp_path / "mlruns")
    return tmp_path
