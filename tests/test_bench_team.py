"""The team benchmark's params.yaml edits (benchmarks/team.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.common import ROOT
from benchmarks.team import FIXED, edit
from tests.team import hold_stopped


def test_edit_sets_keys_and_merges_the_search_space_key_by_key(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    space = yaml.safe_load((ROOT / "params.yaml").read_text())["tune"]["search_space"]
    edit(tmp_path, "tune", n_trials=12, pruner="none", search_space=FIXED)
    tune = yaml.safe_load((tmp_path / "params.yaml").read_text())["tune"]
    assert (tune["n_trials"], tune["pruner"]) == (12, "none")
    # The cost-setting keys hold one value each; lr, dropout and weight decay stay as they were.
    assert tune["search_space"] == {**space, **FIXED}
    assert tune["search_space"]["batch_size"] == [64] and space["batch_size"] != [64]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "code", "line", "moment"),
    [
        (signal.SIGTERM, 143, "[bench] terminated", "answered"),
        (signal.SIGINT, 130, "[bench] interrupted", "answered"),
        (signal.SIGTERM, 143, "[bench] terminated", "starting"),
        (signal.SIGINT, 130, "[bench] interrupted", "starting, twice"),
    ],
    ids=["sigterm", "ctrl-c", "sigterm-while-the-server-starts", "ctrl-c-twice-while-it-starts"],
)
def test_a_stopped_bench_stops_its_team_server_and_leaves_no_files(
    stop, code, line, moment, tmp_path
):
    """A CI job's timeout or `kill` (SIGTERM), or ^C, stops `make bench`: it says so in one
    line (exit 143 or 130), stops the PostgreSQL and MLflow server its team comparison started
    (also one still starting, whose pid `runway server stop` does not know yet), removes its
    scratch folders, and writes no report. A second ^C, to the bench's process group as a
    terminal sends it, while the server is being stopped (held up here: the MLflow server is
    stopped, so its SIGTERM waits) does not cut that stop short."""
    import psutil

    from pipeline.server import group_alive

    scratch = Path(tempfile.mkdtemp(prefix="runway-bench-test-"))  # PostgreSQL's user reaches it
    scratch.chmod(0o755)
    report = tmp_path / "bench.json"
    bench = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--only", "team", "--out", str(report)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,  # as a command started from a shell
    )

    def mlflow_server() -> psutil.Process | None:
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or ())
            if "--artifacts-destination" in cmdline and str(scratch) in cmdline:
                return process
        return None

    server, mlflow = [], None
    try:
        deadline = time.monotonic() + 180
        answered = "runway-bench-server-*/server/client.env"
        while (mlflow := mlflow_server()) is None or (
            moment == "answered" and not list(scratch.glob(answered))
        ):
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the team server never started"
            time.sleep(0.1)
        if moment == "starting, twice":  # its stop is held up: the SIGTERM it gets waits
            hold_stopped(mlflow)
        (folder,) = scratch.glob("runway-bench-server-*")

        def of_the_server(process) -> bool:  # PostgreSQL's, or MLflow's process group
            try:
                named = str(folder) in " ".join(process.info["cmdline"] or ())
                return named or os.getpgid(process.pid) == mlflow.pid
            except ProcessLookupError:  # ended meanwhile
                return False

        server = [process for process in psutil.process_iter(["cmdline"]) if of_the_server(process)]
        started = {Path((process.info["cmdline"] or [""])[0]).name for process in server}
        assert {"postgres", Path(sys.executable).name} <= started  # and the MLflow server
        if moment == "starting, twice":
            (starter,) = [p for p in psutil.Process(bench.pid).children() if "start" in p.cmdline()]
            os.killpg(bench.pid, stop)
            time.sleep(1)
            os.killpg(bench.pid, stop)
            time.sleep(1.5)
            # `runway server start` is still stopping the MLflow server it started.
            assert starter.is_running() and starter.status() != psutil.STATUS_ZOMBIE
            os.killpg(mlflow.pid, signal.SIGCONT)
        else:
            bench.send_signal(stop)
        out, err = bench.communicate(timeout=120)
        assert (bench.returncode, out, err) == (code, "[bench] team …\n", f"{line}\n")
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert alive == []
        assert not group_alive(mlflow.pid)
        assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("runway-")) == []
        assert not report.exists()
    finally:
        bench.kill()
        bench.wait()
        for process in server:  # what a failed check left running
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        for folder in scratch.glob("runway-bench-server-*/server"):
            subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "server", "stop"],
                env={**os.environ, "RUNWAY_SERVER_DIR": str(folder)},
                capture_output=True,
            )
        shutil.rmtree(scratch, ignore_errors=True)


# A child that says it runs, then on SIGTERM takes half a second to end and says so; or, given
# "ignore", ignores SIGTERM. It ends by itself after a minute.
CHILD = """
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])

def terminated(signum, frame):
    time.sleep(0.5)  # ending its runs
    log.write_text("terminated")
    sys.exit(143)

signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2] == "ignore" else terminated)
log.write_text("running")
for _ in range(600):
    time.sleep(0.1)
"""


@pytest.mark.parametrize(
    ("on_sigterm", "grace", "log_after"), [("end", 30, "terminated"), ("ignore", 1, "running")]
)
def test_a_stopped_bench_ends_its_running_child_with_sigterm_first(
    on_sigterm, grace, log_after, tmp_path, monkeypatch
):
    """Stopped while a child process runs (a tune stage, say), the bench sends it SIGTERM, the
    signal a stage stops its workers and ends its runs on, and waits for it; a child still
    running after STOP_GRACE_S seconds is killed. Either way none is left running."""
    import psutil

    from benchmarks import common

    monkeypatch.setattr(common, "STOP_GRACE_S", grace)
    log = tmp_path / "child.log"

    class Stopped(Exception):
        pass

    def stop_once_running(signum, frame):  # the bench's SIGTERM, once the child runs
        if log.exists() and log.read_text() == "running":
            signal.setitimer(signal.ITIMER_REAL, 0)  # once: the bench's cleanup goes on
            raise Stopped

    before = {child.pid for child in psutil.Process().children()}
    previous = signal.signal(signal.SIGALRM, stop_once_running)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    try:
        with pytest.raises(Stopped):
            common.timed([sys.executable, "-c", CHILD, str(log), on_sigterm], tmp_path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert log.read_text() == log_after
    assert {child.pid for child in psutil.Process().children()} <= before


def test_only_the_first_sigterm_stops_the_bench():
    """The first SIGTERM stops the comparisons; any later one is ignored, also where code in
    the bench's process (a training run deferring signals to a step's end) put the handler
    back, so the cleanup (the team server's stop) is not cut short."""
    from benchmarks import run
    from pipeline.io import Terminated

    previous = signal.getsignal(signal.SIGTERM)
    run.STOPPING.clear()
    try:
        with pytest.raises(Terminated):
            run.terminated(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, run.terminated)  # put back, as a deferring block does
        assert run.terminated(signal.SIGTERM, None) is None
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.STOPPING.clear()
