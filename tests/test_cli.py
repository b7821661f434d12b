"""The `runway` command: help, the summary (only what this store and these outputs say, and
where they disagree), the baseline, and the UI server (local only); every failure is one
line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from tests.conftest import TINY, copy_project, edit_params, new_store, project_env, run
from tests.formats import write_iris_csv

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli")]

UI = "  open the UI     make ui   (then http://127.0.0.1:5000)"
FROM_FILES = (
    ": the test results and model below are what reports/evaluate/metrics.json and "
    "reports/register.json say, logged elsewhere."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error(result: subprocess.CompletedProcess, line: str, code: int = 1) -> None:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.splitlines() == [line]


def test_help_explains_the_commands(tmp_path):
    out = run(["runway", "--help"], tmp_path).stdout
    for command in ("summary", "ui", "baseline"):
        assert command in out
    assert "no authentication" in run(["runway", "ui", "--help"], tmp_path).stdout


def test_summary_without_results_says_what_to_do(tmp_path):
    result = run(["runway", "summary"], tmp_path, check=False)
    assert result.returncode == 1 and "make repro" in result.stderr


# ------------------------------------------------------------------- a project with results


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Iris from a CSV through the whole pipeline (seconds of training), committed."""
    project = copy_project(tmp_path_factory.mktemp("cli"))
    write_iris_csv(project / "data/external/iris.csv")
    edit_params(
        project,
        {
            **TINY,
            "data": {"source": "csv", "path": "data/external/iris.csv", "label_column": "species"},
            "model": {"name": "mlp"},
            "validate": {"min_per_class": 5},
            "register": {"model_name": "iris"},
            "mlflow": {"experiment": "runway-iris"},
        },
    )
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], project)
    return project


def results(project: Path) -> list[str]:
    """The lines for the test results and the registered model, from the files."""
    test = json.loads((project / "reports/evaluate/metrics.json").read_text())["test"]
    record = json.loads((project / "reports/register.json").read_text())
    assert record["version"] == 1 and record["reason"] == "no champion yet"
    return [
        f"  test accuracy   {test['accuracy']:.4f}",
        f"  test macro F1   {test['f1_macro']:.4f}",
        "  model           iris version 1 (aliases: challenger, champion)",
        "  decision        promoted to champion: no champion yet",
        f"  MLflow run      {record['run_id']}",
    ]


def run_id(project: Path) -> str:
    return json.loads((project / "reports/register.json").read_text())["run_id"]


DATA = "  data            150 rows, 1 quarantined (see reports/validation/quarantine.csv)"


def summary(project: Path) -> list[str]:
    return run(["runway", "summary"], project).stdout.splitlines()


@pytest.mark.parametrize("store", ["deleted", "empty"])
def test_summary_when_the_store_lacks_the_run(project, tmp_path, store):
    # With the store that logged the run: the results as they were, nothing set aside.
    assert summary(project) == ["", "Runway results", DATA, *results(project), UI, ""]
    db = project / "mlruns/mlflow.db"
    kept = shutil.move(db, tmp_path / "mlflow.db")
    try:
        if store == "empty":
            new_store(project / "mlruns")
        where = "mlruns/mlflow.db does not exist" if store == "deleted" else "mlruns/mlflow.db"
        note = f"MLflow run {run_id(project)} is not in this store ({where})" + FROM_FILES
        assert summary(project) == [
            "",
            "Runway results",
            DATA,
            "",
            note,
            *results(project),
            "",
            UI,
            "",
        ]
    finally:
        shutil.move(kept, db)


def test_summary_in_a_fresh_clone(project, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    shutil.copy2(project / "data/external/iris.csv", clone / "data/external/iris.csv")
    assert not (clone / "mlruns/mlflow.db").exists()
    missing = "data/raw missing, data/prepared missing, reports/validation missing, "
    assert summary(clone) == [
        "",
        "Runway results",
        "Out of date: ingest, validate, tune, train, evaluate, register ("
        + missing
        + "reports/tune missing and 2 more): `dvc repro` brings them in line.",
        f"MLflow run {run_id(project)} is not in this store (mlruns/mlflow.db does not exist)"
        + FROM_FILES,
        *results(project),
        "",
        UI,
        "",
    ]
    assert not (clone / "mlruns/mlflow.db").exists()  # looking made no store


HOLD = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(600)
"""


def test_summary_and_baseline_after_new_data_and_a_failed_run(project):
    """New data passes validation, then the run stops at tune (the MLflow store is locked):
    the row count is today's, the test results and model are of the earlier data."""
    accuracy = results(project)[0].split()[-1]
    out = run(["runway", "baseline"], project).stdout.splitlines()
    assert out[0].startswith("RBF SVC (C=") and out[0].endswith("on 18 samples")
    assert out[1:] == [f"pipeline model: test accuracy {accuracy}"]  # the same test split

    lock = (project / "dvc.lock").read_text()
    csv = project / "data/external/iris.csv"
    try:
        csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:121]))
        run(["dvc", "repro", "validate"], project)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(project / "mlruns/mlflow.db")],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "locked"
            failed = run(["dvc", "repro"], project, False, {"RUNWAY_MLFLOW_LOCK_TIMEOUT": "1"})
        finally:
            holder.kill()
            holder.wait()
        assert failed.returncode != 0
        errors = [line for line in failed.stderr.splitlines() if "] error: " in line]
        assert errors == [
            "[tune] error: mlruns/mlflow.db is locked by another process (waited 1 s; "
            "RUNWAY_MLFLOW_LOCK_TIMEOUT sets the wait): let that process finish or stop it "
            "(`lsof mlruns/mlflow.db` names it), then run again"
        ]
        assert summary(project) == [
            "",
            "Runway results",
            "  data            120 rows, 0 quarantined",
            "",
            "Out of date: tune, train, evaluate, register (data/prepared changed): "
            "`dvc repro` brings them in line.",
            *results(project),
            "",
            UI,
            "",
        ]
        out = run(["runway", "baseline"], project).stdout.splitlines()
        assert out[0].endswith("on 15 samples")
        assert out[1:] == [
            f"pipeline model: test accuracy {accuracy} on another test set "
            "(reports/evaluate/predictions.csv does not list the samples of "
            "data/prepared/test.parquet): `dvc repro` evaluates it on this one"
        ]
    finally:
        write_iris_csv(csv)
        (project / "dvc.lock").write_text(lock)
        run(["dvc", "checkout", "--force"], project)
    assert run(["dvc", "status", "--json"], project).stdout.strip() == "{}"


# ------------------------------------------------------------------------------- baseline


def test_baseline_before_any_run_says_to_run_the_pipeline(tmp_path):
    one_error(
        run(["runway", "baseline"], tmp_path, check=False),
        "[baseline] error: data/prepared/train.parquet not found: run the pipeline first "
        "(`dvc repro`; `dvc repro validate` makes the data alone)",
    )


def test_baseline_refuses_a_bad_grid(tmp_path):
    result = run(["runway", "baseline", "--c-grid", "1,abc"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for --c-grid: 'abc' is not a number > 0"
    )


# ------------------------------------------------------------------------------------ ui


def test_ui_refuses_a_port_out_of_range(tmp_path):
    result = run(["runway", "ui", "--port", "99999"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--port': Input should be less than or equal to 65535"
    )
    assert "Traceback" not in result.stderr


def test_ui_on_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_error(
            run(["runway", "ui", "--port", str(port)], tmp_path, check=False),
            f"[ui] error: port {port} on 127.0.0.1 is already in use (another `runway ui` or "
            "MLflow server?): stop it or choose another --port",
        )


def test_ui_over_a_corrupt_store(tmp_path):
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns/mlflow.db").write_bytes(bytes(range(256)) * 16)
    one_error(
        run(["runway", "ui", "--port", str(_free_port())], tmp_path, check=False),
        "[ui] error: mlruns/mlflow.db is not a readable MLflow store (file is not a database): "
        "move it aside (`mv mlruns/mlflow.db mlruns/mlflow.db.broken`) and run again; a new "
        "empty store is made, the artifacts under mlruns/artifacts/ stay, and `dvc repro` logs "
        "only the stages it reruns (`dvc repro -f` runs and logs them all)",
    )


def test_ui_whose_server_never_answers_exits_non_zero(tmp_path, monkeypatch):
    """`mlflow ui` exits 0 when its server cannot bind: the command must not."""
    from pipeline import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "bind_problem", lambda host, port: None)  # skip the early check
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli.app, ["ui", "--port", str(port)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"[ui] error: the MLflow server stopped before it answered on http://127.0.0.1:{port} "
        "(its messages are above)"
    )


def test_ui_serves_the_store_on_loopback_only(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        ["runway", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, body = time.monotonic() + 90, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None and "OK" in body, "the MLflow UI did not answer"
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}
        assert (tmp_path / "mlruns/mlflow.db").is_file()
    finally:
        for child in psutil.Process(server.pid).children(recursive=True):
            child.kill()
        server.kill()
        server.wait(timeout=30)
