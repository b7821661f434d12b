"""The `runway` command: help, the UI server (local only) and the summary."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import psutil
import pytest

from tests.conftest import project_env, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_help_explains_the_commands(tmp_path):
    out = run(["runway", "--help"], tmp_path).stdout
    for command in ("summary", "ui", "baseline"):
        assert command in out
    assert "no authentication" in run(["runway", "ui", "--help"], tmp_path).stdout


@pytest.mark.slow
def test_summary_without_results_says_what_to_do(tmp_path):
    result = run(["runway", "summary"], tmp_path, check=False)
    assert result.returncode == 1 and "make repro" in result.stderr


@pytest.mark.slow
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
