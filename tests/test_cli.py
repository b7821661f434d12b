"""The `runway` command: help, the summary (only what this store and these outputs say, and
where they disagree), the baseline, and the UI server (local only); every failure is one
line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from tests.conftest import IRIS, copy_project, edit_params, new_store, project_env, run
from tests.formats import write_iris_csv
from tests.ui import UiProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli")]

UI = "  open the UI     make ui   (then http://127.0.0.1:5000)"
FROM_FILES = (
    ": the test results and model below are what reports/evaluate/metrics.json and "
    "reports/register.json say, logged elsewhere."
)


def one_error(result: subprocess.CompletedProcess, line: str, code: int = 1) -> None:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.splitlines() == [line]


def test_help_explains_the_commands(tmp_path):
    out = run(["runway", "--help"], tmp_path).stdout
    commands = ("summary", "ui", "baseline", "retrain", "remote", "server", "tune-worker")
    for command in commands:
        assert command in out
    # python -m pipeline.cli is the same program, every command included
    module = run([sys.executable, "-m", "pipeline.cli", "--help"], tmp_path).stdout
    assert all(command in module for command in commands)
    assert "no authentication" in run(["runway", "ui", "--help"], tmp_path).stdout
    worker = run(["runway", "tune-worker", "--help"], tmp_path).stdout
    assert "tune.n_trials finished trials in total" in " ".join(worker.split())


def test_summary_without_results_says_what_to_do(tmp_path):
    result = run(["runway", "summary"], tmp_path, check=False)
    assert result.returncode == 1 and "make repro" in result.stderr


# ------------------------------------------------------------------- a project with results


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Iris from a CSV through the whole pipeline (seconds of training), committed."""
    project = copy_project(tmp_path_factory.mktemp("cli"))
    write_iris_csv(project / "data/external/iris.csv")
    edit_params(project, IRIS)
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], project)
    return project


def results(project: Path) -> list[str]:
    """The lines for the test results and the registered model, from the files."""
    test = json.loads((project / "reports/evaluate/metrics.json").read_text())
    record = json.loads((project / "reports/register.json").read_text())
    assert record["version"] == 1 and record["reason"] == "no champion yet"
    return [
        f"  test/accuracy   {test['test/accuracy']:.4f}",
        f"  test/f1_macro   {test['test/f1_macro']:.4f}",
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
        + "reports/tune missing and 3 more): `dvc repro` brings them in line.",
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
    train_rows = len(pd.read_parquet(project / "data/prepared/train.parquet"))
    assert f", fitted on {train_rows} training samples): test accuracy " in out[0]
    assert out[1:] == [f"pipeline model: test accuracy {accuracy}"]  # the same test split
    # Large data: the SVC fits on a sample of the training split (same sample each time).
    few = [run(["runway", "baseline", "--train-samples", "30"], project).stdout for _ in "ab"]
    assert ", fitted on 30 training samples): test accuracy " in few[0]
    assert few[0] == few[1]

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


def bare_project(folder: Path, store: bool = True) -> Path:
    """A folder that `runway ui` takes for a project: dvc.yaml, params.yaml and a store."""
    (folder / "dvc.yaml").write_text("stages: {}\n")
    (folder / "params.yaml").write_text("mlflow:\n  experiment: bare\n")
    if store:
        new_store(folder / "mlruns")
    return folder


def ui_exits(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`runway ui` run where it must stop at once; one that serves instead fails the test."""
    command = ["runway", "ui", *args]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"runway ui served instead of stopping:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_ui_outside_a_project(tmp_path):
    one_error(
        ui_exits(tmp_path, "--port", str(free_port())),
        f"[ui] error: {tmp_path} is not inside a Runway project (no folder at or above it "
        "holds dvc.yaml and params.yaml): run `runway ui` in the project",
    )
    assert list(tmp_path.iterdir()) == []


def test_ui_without_a_store_makes_none(tmp_path):
    bare_project(tmp_path, store=False)
    (tmp_path / "src").mkdir()
    one_error(
        ui_exits(tmp_path / "src", "--port", str(free_port())),
        f"[ui] error: no MLflow store at {tmp_path}/mlruns/mlflow.db yet: `dvc repro` makes it",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml", "params.yaml", "src"]
    assert list((tmp_path / "src").iterdir()) == []


def test_ui_on_a_port_in_use(tmp_path):
    bare_project(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_error(
            ui_exits(tmp_path, "--port", str(port)),
            f"[ui] error: port {port} on 127.0.0.1 is already in use (another `runway ui` or "
            "MLflow server?): stop it or choose another --port",
        )


def test_ui_over_a_corrupt_store(tmp_path):
    bare_project(tmp_path, store=False)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns/mlflow.db").write_bytes(bytes(range(256)) * 16)
    one_error(
        ui_exits(tmp_path, "--port", str(free_port())),
        "[ui] error: mlruns/mlflow.db is not a readable MLflow store (file is not a database): "
        "move it aside (`mv mlruns/mlflow.db mlruns/mlflow.db.broken`) and run again; a new "
        "empty store is made, the artifacts under mlruns/artifacts/ stay, and `dvc repro` logs "
        "only the stages it reruns (`dvc repro -f` runs and logs them all)",
    )


def test_ui_whose_server_never_answers_exits_non_zero(tmp_path, monkeypatch):
    """`mlflow ui` may exit 0 when its server cannot bind, or 1 (from the same run of
    the same MLflow, depending on how its server process ends): the command exits 1 either
    way, with its line."""
    from pipeline import cli

    monkeypatch.chdir(bare_project(tmp_path))
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


def stopped_cleanly(ui: UiProcess, signum: int) -> None:
    """``signum`` to `runway ui` alone: it stops its server, leaves no process and exits 0."""
    children = psutil.Process(ui.proc.pid).children(recursive=True)
    assert children, "no MLflow server process"
    ui.proc.send_signal(signum)
    assert ui.proc.wait(timeout=60) == 0, "\n".join(ui.lines[-40:])
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", ui.port)) != 0  # nothing listens any more


def test_ui_from_a_subfolder_serves_and_links_the_project_store(project):
    from mlflow.tracking import MlflowClient

    def files(folder: Path) -> set[Path]:
        return {p for p in folder.rglob("*") if "__pycache__" not in p.parts}

    sub = project / "pipeline"
    before = files(sub)
    ui = UiProcess(sub)
    try:
        heading = ui.wait_for("Open in the MLflow UI:")
        time.sleep(0.5)
        base = f"http://127.0.0.1:{ui.port}"
        assert ui.lines[0] == (
            f"MLflow UI for sqlite:///{project}/mlruns/mlflow.db on {base} (Ctrl+C to stop)"
        )
        # The links come once the server answered the command's /health request.
        answered = [i for i, line in enumerate(ui.lines) if '"GET /health HTTP/1.1" 200' in line]
        assert answered and answered[0] < heading
        uri = f"sqlite:///{project}/mlruns/mlflow.db"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name("runway-iris").experiment_id
        train = client.search_runs(
            [experiment], "tags.stage = 'train'", order_by=["attributes.start_time DESC"]
        )[0].info.run_id
        assert train == run_id(project)
        champion = client.get_model_version_by_alias("iris", "champion").version
        view = "?workflowType=machine_learning"
        assert ui.lines[heading + 1 : heading + 5] == [
            f"  runs            {base}/#/experiments/{experiment}{view}  (runway-iris)",
            f"  latest training {base}/#/experiments/{experiment}/runs/{train}{view}",
            f"  champion model  {base}/#/models/iris/versions/{champion}{view}  "
            f"(iris version {champion})",
            "",
        ]
        with urllib.request.urlopen(f"{base}/health", timeout=10) as answer:
            assert answer.read().decode() == "OK"
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == ui.port
        }
        assert listening == {"127.0.0.1"}
        stopped_cleanly(ui, signal.SIGTERM)
    finally:
        ui.kill()
    assert files(sub) == before  # no store made where it was run
    assert not (sub / "mlruns").exists()


def test_ui_stops_its_server_on_ctrl_c(project):
    """^C while the server is still starting: the same clean stop."""
    ui = UiProcess(project)
    try:
        ui.wait_for(f"Uvicorn running on http://127.0.0.1:{ui.port}", part=True)
        stopped_cleanly(ui, signal.SIGINT)
    finally:
        ui.kill()
