"""A real team server (PostgreSQL + MLflow with basic auth) for tests, in a folder that
PostgreSQL's user can reach (pytest's own tmp folders are private to root)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline.io import env_scope
from tests.conftest import run
from tests.ui import free_port


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@dataclass
class Team:
    folder: Path  # the server's state folder (RUNWAY_SERVER_DIR)
    env: dict[str, str]  # RUNWAY_SERVER_DIR, for `runway server ...`
    started: str  # what `runway server start` printed
    port: int

    @property
    def client(self) -> dict[str, str]:
        """What a client sets: MLFLOW_TRACKING_URI/USERNAME/PASSWORD (and the study database)."""
        return read_env(self.folder / "client.env")


@contextmanager
def team_server(*options: str) -> Iterator[Team]:
    """``runway server start --port <free port> *options`` in a folder of its own."""
    folder = Path(tempfile.mkdtemp(prefix="runway-server-"))
    folder.chmod(0o755)
    env = {"RUNWAY_SERVER_DIR": str(folder / "server")}
    port = free_port()
    try:
        command = ["runway", "server", "start", "--port", str(port), *options]
        started = run(command, Path.cwd(), env=env)
        yield Team(folder / "server", env, started.stdout, port)
    finally:
        run(["runway", "server", "stop"], Path.cwd(), env=env, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def client_environ(client: dict[str, str]):
    """``client`` set in this process's environment for the block."""
    return env_scope(client)


def hold_stopped(leader: psutil.Process, timeout: float = 60) -> None:
    """SIGSTOP ``leader``'s process group and wait until its processes are stopped: a SIGSTOP
    still pending (a process not scheduled since it was sent, as on a busy machine) loses to
    a SIGTERM sent meanwhile, which the kernel acts on first, so the process would end."""
    os.killpg(leader.pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout

    def running(process: psutil.Process) -> bool:
        try:
            return process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:  # a child that ended meanwhile
            return False

    while any(running(p) for p in [leader, *leader.children(recursive=True)]):
        assert time.monotonic() < deadline, f"process group {leader.pid} did not stop"
        time.sleep(0.01)
