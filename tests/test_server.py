"""`runway server`: real PostgreSQL and a real MLflow tracking server with basic auth."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from tests.conftest import TINY, copy_project, edit_params, run
from tests.team import client_environ, hold_stopped, read_env, team_server

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("server")]


@pytest.fixture(scope="module")
def server():
    """(folder, env, start output, port) of a server of this module's own."""
    with team_server() as team:
        yield team.folder, team.env, team.started, team.port


def request(url: str, auth: tuple[str, str] | None = None, host: str | None = None):
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + b64encode(":".join(auth).encode()).decode()
    if host:
        headers["Host"] = host
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def test_start_prints_the_admin_password_once_and_keeps_secrets_private(server):
    folder, env, out, port = server
    secret = read_env(folder / "credentials.env")
    password = secret["MLFLOW_TRACKING_PASSWORD"]
    assert out.splitlines()[0].startswith(f"[server] MLflow at http://127.0.0.1:{port} on ")
    assert out.count(password) == 1
    pg_port = json.loads((folder / "server.json").read_text())["pg_port"]
    db_password = secret["RUNWAY_DB_PASSWORD"]
    assert read_env(folder / "client.env") == {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": password,
        "OPTUNA_STORAGE": f"postgresql+psycopg://runway:{db_password}@127.0.0.1:{pg_port}/optuna",
    }
    for name in ("credentials.env", "client.env", "basic_auth.ini"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    data = folder / "pg" / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    if os.geteuid() == 0:
        assert data.owner() == "postgres"
    again = run(["runway", "server", "start", "--port", str(port)], Path.cwd(), env=env)
    assert password not in again.stdout  # already running: nothing new to show
    import psutil

    for proc in psutil.process_iter(["cmdline"]):  # any local user can read command lines
        shown = " ".join(proc.info["cmdline"] or [])
        assert not any(v in shown for k, v in secret.items() if v != "admin"), shown[:200]
    logs = [folder / "mlflow.log", folder / "pg" / "run" / "postgres.log"]
    for log in logs:
        text = log.read_text(errors="replace")
        for value in secret.values():
            if value != "admin":
                assert value not in text, log


def test_the_api_wants_credentials_and_a_known_host(server):
    folder, _, _, port = server
    client = read_env(folder / "client.env")
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
    code, headers, _ = request(url)
    assert code == 401 and headers.get("WWW-Authenticate", "").startswith("Basic")
    code, _, _ = request(url, auth=("admin", "wrong-password-0000"))
    assert code == 401
    code, _, body = request(url, auth=("admin", client["MLFLOW_TRACKING_PASSWORD"]))
    assert code == 200 and '"name": "Default"' in body
    admin = ("admin", client["MLFLOW_TRACKING_PASSWORD"])
    code, _, body = request(url, auth=admin, host="evil.example")
    assert code == 403 and "Invalid Host header" in body


def test_both_listen_on_loopback_only(server):
    import json

    import psutil

    folder, _, _, port = server

    pg_port = json.loads((folder / "server.json").read_text())["pg_port"]
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in (port, pg_port)
    }
    assert listening == {("127.0.0.1", port), ("127.0.0.1", pg_port)}


def test_a_run_and_its_artifact_go_through_the_server(server, monkeypatch, tmp_path):
    import mlflow

    folder, _, _, _ = server
    client_env = read_env(folder / "client.env")
    for key, value in client_env.items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("server-test")
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "train.lr", 0.01)
    (tmp_path / "note.txt").write_text("through the server\n")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run_id)
    back = client.download_artifacts(run_id, "note.txt", str(tmp_path / "back"))
    assert Path(back).read_text() == "through the server\n"
    stored = list((folder / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "through the server\n"
    assert client.get_run(run_id).data.params == {"train.lr": "0.01"}


def test_the_whole_pipeline_logs_to_the_server(server, tmp_path):
    """dvc repro on tiny params with MLFLOW_TRACKING_URI set: validate, the tune parent and
    its nested trials, train, evaluate and register, artifacts through the server."""
    import mlflow

    folder, _, _, _ = server
    client_env = read_env(folder / "client.env")
    project = copy_project(tmp_path / "p")
    edit_params(project, {**TINY, "mlflow": {"experiment": "team"}})
    run(["dvc", "repro"], project, env=client_env)
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as local:  # the empty local store
        assert local.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
    with client_environ(client_env):
        client = mlflow.MlflowClient(client_env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("team")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        names = sorted(
            "trial" if " · trial " in r.info.run_name else r.info.run_name.split(" ")[0]
            for r in runs
        )
        parent = next(r for r in runs if r.info.run_name.startswith("tune"))
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(trials) == 2
        # validate, the tune parent, its two trials and train (evaluate logs into train's run)
        assert names == ["train", "trial", "trial", "tune", "validate"]
        train = next(r for r in runs if r.info.run_name.startswith("train"))
        assert "test/accuracy" in train.data.metrics
        champion = client.get_model_version_by_alias("digits-cnn", "champion")
        local = mlflow.artifacts.download_artifacts(
            f"models:/digits-cnn/{champion.version}", dst_path=str(tmp_path / "model")
        )
        assert (Path(local) / "MLmodel").is_file()
        validate = next(r for r in runs if r.info.run_name == "validate")
        listed = [a.path for a in client.list_artifacts(validate.info.run_id, "validation")]
        assert "validation/summary.html" in listed
        secret = read_env(folder / "credentials.env")
        for r in runs:
            shown = " ".join([*r.data.params.values(), *r.data.tags.values()])
            assert client_env["MLFLOW_TRACKING_PASSWORD"] not in shown
            assert secret["RUNWAY_DB_PASSWORD"] not in shown


def test_status_then_stop(server):
    folder, env, _, port = server
    status = run(["runway", "server", "status"], Path.cwd(), env=env)
    assert status.stdout.splitlines()[0].startswith(f"[server] MLflow http://127.0.0.1:{port}: up;")
    stopped = run(["runway", "server", "stop"], Path.cwd(), env=env)
    assert stopped.stdout.startswith("[server] stopped MLflow server (pid ")
    down = run(["runway", "server", "status"], Path.cwd(), env=env, check=False)
    assert down.returncode == 1 and ": down; PostgreSQL" in down.stdout
    restarted = run(["runway", "server", "start", "--port", str(port)], Path.cwd(), env=env)
    assert restarted.stdout.startswith(f"[server] MLflow at http://127.0.0.1:{port}")


def test_serving_other_machines_keeps_auth_and_the_host_check():
    """--host 0.0.0.0: MLflow on every address (PostgreSQL still on loopback only), answering
    this machine's address and --allowed-host names, with a password; other names get 403."""
    import socket

    import psutil

    with team_server("--host", "0.0.0.0", "--allowed-host", "runway.example") as team:
        pg_port = json.loads((team.folder / "server.json").read_text())["pg_port"]
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in (team.port, pg_port)
        }
        assert listening == {("0.0.0.0", team.port), ("127.0.0.1", pg_port)}
        address = socket.gethostbyname(socket.gethostname())
        url = f"http://{address}:{team.port}/api/2.0/mlflow/experiments/search?max_results=5"
        admin = ("admin", team.client["MLFLOW_TRACKING_PASSWORD"])
        assert request(url)[0] == 401
        assert request(url, auth=admin)[0] == 200
        assert request(url, auth=admin, host=f"runway.example:{team.port}")[0] == 200
        code, _, body = request(url, auth=admin, host=f"elsewhere.example:{team.port}")
        assert code == 403 and "Invalid Host header" in body


@pytest.mark.parametrize(
    "stop, code, how",
    [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "stopped by SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)
def test_start_stopped_while_the_mlflow_server_starts_leaves_no_server_running(stop, code, how):
    """^C (or a job runner's SIGTERM) during `runway server start`, while it waits for the
    MLflow server to answer, stops that server too: its pid is recorded only once it answers,
    so `runway server stop` could not find it (and it would keep the port). A second stop
    while that server is being stopped (here it is held stopped, so its stop takes a while)
    does not cut the stop short."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    from pipeline.server import group_alive
    from tests.ui import free_port

    folder = Path(tempfile.mkdtemp(prefix="runway-server-"))  # PostgreSQL's user reaches it
    folder.chmod(0o755)
    env = {**os.environ, "RUNWAY_SERVER_DIR": str(folder / "server")}
    start = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "server", "start", "--port", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mlflow = None
    try:
        marker = f"--artifacts-destination {folder / 'server' / 'artifacts'}"
        deadline = time.monotonic() + 120
        while mlflow is None:
            assert start.poll() is None, start.communicate()
            assert time.monotonic() < deadline, "the MLflow server never started"
            for process in psutil.process_iter(["cmdline"]):
                if marker in " ".join(process.info["cmdline"] or ()):
                    mlflow = process
            time.sleep(0.05)
        hold_stopped(mlflow)  # SIGTERM waits until it is continued
        start.send_signal(signal.Signals[stop])
        time.sleep(1)
        start.send_signal(signal.Signals[stop])  # the second, while the server is being stopped
        time.sleep(1.5)
        assert start.poll() is None  # still stopping it
        os.killpg(mlflow.pid, signal.SIGCONT)
        out, err = start.communicate(timeout=60)
        assert (start.returncode, out) == (code, "")  # stopped before the server answered
        assert err == f"[server] start {how}: runway server stop stops what it started\n"
        assert not (folder / "server" / "client.env").exists()
        gone, alive = psutil.wait_procs([mlflow], timeout=15)
        assert alive == []
        assert not group_alive(mlflow.pid)
    finally:
        start.kill()
        start.wait()
        if mlflow is not None and group_alive(mlflow.pid):
            os.killpg(mlflow.pid, signal.SIGKILL)
        run(["runway", "server", "stop"], Path.cwd(), env=env, check=False)  # PostgreSQL
        shutil.rmtree(folder, ignore_errors=True)
