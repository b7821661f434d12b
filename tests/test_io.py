"""Atomic outputs: a directory output is replaced in one step, and a writer killed at any
point leaves either the previous output or the new one, never none."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.io import atomic_dir, exchange

# Writes version 2 of out/ over version 1 and SIGKILLs itself at the named point.
KILLED_WRITER = """
import os, shutil, signal, sys
from pathlib import Path
from pipeline import io

point = sys.argv[1]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "after-swap":  # the new output is in place, the old one not yet removed
    io.shutil.rmtree = die
elif point == "between-moves":  # no atomic exchange here: killed between the two moves
    io.exchange = lambda a, b: False
    real = os.replace
    calls = []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            die()
        return real(src, dst)
    io.os.replace = replace
with io.atomic_dir("out") as tmp:
    (tmp / "version").write_text("2")
"""


def write(folder: Path, version: str) -> None:
    with atomic_dir(folder / "out") as tmp:
        (tmp / "version").write_text(version)


def killed_writer(folder: Path, point: str) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, point], cwd=folder)
    assert result.returncode == -signal.SIGKILL


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b").mkdir()
    assert exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "f").read_text() == "a" and not any((tmp_path / "a").iterdir())


def test_killed_after_the_swap_leaves_the_new_output_and_the_next_write_cleans_up(tmp_path):
    write(tmp_path, "1")
    killed_writer(tmp_path, "after-swap")
    assert (tmp_path / "out" / "version").read_text() == "2"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.")  # the old one, hidden
    write(tmp_path, "3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "version").read_text() == "3"


def test_killed_between_two_moves_the_previous_output_comes_back(tmp_path):
    write(tmp_path, "1")
    killed_writer(tmp_path, "between-moves")
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.old" / "version").is_file()
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out"):
        raise RuntimeError("this writer fails too")
    assert (tmp_path / "out" / "version").read_text() == "1"  # put back before anything else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# A stage whose ^C lands while a weakref callback runs: Python cannot raise the
# KeyboardInterrupt there, prints "Exception ignored in: ..." and drops it.
LOST_INTERRUPT = """
import sys, time, weakref
from pipeline.io import run_stage

class Held:
    pass

def callback(_):
    raise KeyboardInterrupt  # what Python's SIGINT handler raises in whatever code runs

def main():
    held = Held()
    ref = weakref.ref(held, callback)
    del held  # the callback runs here
    if sys.argv[1] == "sleeps":
        time.sleep(30)
        print("ran on", flush=True)

run_stage("demo", main)
time.sleep(0.5)  # after the stage, as the interpreter's exit work (atexit) would run
print("after the stage", flush=True)
"""


def dropped_interrupt(folder: Path, then: str) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, "-c", LOST_INTERRUPT, then], cwd=folder, capture_output=True, text=True
    )
    return result.returncode, result.stdout, result.stderr


def test_a_ctrl_c_dropped_in_a_callback_still_stops_the_stage_with_one_line(tmp_path):
    import time

    start = time.monotonic()
    assert dropped_interrupt(tmp_path, "sleeps") == (130, "", "[demo] interrupted\n")
    assert time.monotonic() - start < 20  # stopped in its sleep, not after it


def test_a_ctrl_c_dropped_as_the_stage_ends_is_not_sent_after_it(tmp_path):
    """The stage has done its work: the ^C is not sent into what follows it."""
    assert dropped_interrupt(tmp_path, "returns") == (0, "after the stage\n", "")


# Stops itself with ^C, SIGTERM and SIGHUP inside signals_held, starts a child there that says
# which of them it ignores, says which handlers it has after the block, then ^C inside
# signals_deferred (raised on leaving), then ^C again.
HELD = """
import os, signal, subprocess, sys, time
from pipeline.io import signals_deferred, signals_held

STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever this test's shell ignores
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
with signals_held():
    for signum in STOPS:
        os.kill(os.getpid(), signum)
    time.sleep(0.2)
    print("held", flush=True)
    child = "import signal; print([signal.getsignal(s) == signal.SIG_IGN for s in (2, 15, 1)])"
    print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
print([signal.getsignal(s) for s in STOPS], flush=True)
try:
    with signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("deferred", flush=True)
        child = "import signal; print(signal.getsignal(2) is signal.default_int_handler)"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
except KeyboardInterrupt:
    print("raised on leaving", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("not interrupted", flush=True)
"""


def test_signals_held_keeps_a_second_stop_from_cutting_cleanup_short():
    """Inside ``signals_held`` a ^C, SIGTERM or SIGHUP neither interrupts the process nor
    reaches a child it starts (a `runway server stop` run as cleanup); the handlers are put
    back afterwards, and a ^C then interrupts again. Inside ``signals_deferred`` a ^C waits
    until the block ends (a child it starts has the default handler)."""
    result = subprocess.run([sys.executable, "-c", HELD], capture_output=True, text=True)
    assert result.stdout == (
        "held\n"
        "[True, True, True]\n\n"
        "[<built-in function default_int_handler>, <Handlers.SIG_DFL: 0>, <Handlers.SIG_DFL: 0>]\n"
        "deferred\nTrue\n\nraised on leaving\n"
    )
    assert result.returncode == -signal.SIGINT  # the ^C after the block: KeyboardInterrupt
    assert result.stderr.strip().endswith("KeyboardInterrupt")
