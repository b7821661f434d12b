"""The team benchmark's params.yaml edits (benchmarks/team.py)."""

from __future__ import annotations

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
    ("stop", "code", "line"),
    [(signal.SIGTERM, 143, "[bench] terminated"), (signal.SIGINT, 130, "[bench] interrupted")],
    ids=["sigterm", "ctrl-c"],
)
def test_a_stopped_bench_stops_its_team_server_and_leaves_no_files(stop, code, line, tmp_path):
    """A CI job's timeout or `kill` (SIGTERM), or ^C, stops `make bench`: it says so in one
    line (exit 143 or 130), stops the PostgreSQL and MLflow server its team comparison started,
    removes its scratch folders, and writes no report."""
    import psutil

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
    )
    try:
        deadline = time.monotonic() + 180
        while not list(scratch.glob("runway-bench-server-*/server/client.env")):  # it answers
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the team server never started"
            time.sleep(0.5)
        (folder,) = scratch.glob("runway-bench-server-*")
        server = [
            process
            for process in psutil.process_iter(["cmdline"])
            if str(folder) in " ".join(process.info["cmdline"] or ())
        ]
        started = {Path(process.info["cmdline"][0]).name for process in server}
        assert {"postgres", Path(sys.executable).name} <= started  # and the MLflow server
        bench.send_signal(stop)
        out, err = bench.communicate(timeout=120)
        assert (bench.returncode, out, err) == (code, "[bench] team …\n", f"{line}\n")
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert alive == []
        assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("runway-")) == []
        assert not report.exists()
    finally:
        bench.kill()
        bench.wait()
        shutil.rmtree(scratch, ignore_errors=True)


# A child that says it runs, and on SIGTERM says so and ends.
ENDS_ON_SIGTERM = """
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])

def terminated(signum, frame):
    log.write_text("terminated")
    sys.exit(143)

signal.signal(signal.SIGTERM, terminated)
log.write_text("running")
while True:
    time.sleep(0.1)
"""


def test_a_stopped_bench_ends_its_running_child_with_sigterm_first(tmp_path):
    """Stopped while a child process runs (a tune stage, say), the bench sends it SIGTERM, the
    signal a stage stops its workers and ends its runs on, rather than SIGKILL."""
    from benchmarks.common import timed

    log = tmp_path / "child.log"

    class Stopped(Exception):
        pass

    def stop_once_running(signum, frame):  # the bench's SIGTERM, once the child runs
        if log.exists() and log.read_text() == "running":
            signal.setitimer(signal.ITIMER_REAL, 0)  # once: the bench's cleanup goes on
            raise Stopped

    previous = signal.signal(signal.SIGALRM, stop_once_running)
    signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
    try:
        with pytest.raises(Stopped):
            timed([sys.executable, "-c", ENDS_ON_SIGTERM, str(log)], tmp_path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert log.read_text() == "terminated"
