"""The train stage under `dvc repro` when processes are killed: SIGKILL of the whole process
group resumes from the last epoch end to the same model and metrics as a run never stopped;
SIGKILL of `dvc` alone stops the orphaned stage (SIGTERM, exit 143, run KILLED) whichever
shell DVC ran it through; and one training run at a time uses the checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.io import StageError, exclusive
from tests.conftest import copy_project, edit_params, project_env, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train-kill")]

EPOCHS = 3
STEPS = 20  # optimizer steps per epoch: 1252 training rows of the digits in batches of 64
REPRO = ["dvc", "repro", "-f", "-s", "train"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("train-kill"))
    edit_params(
        project,
        {
            "tune": {"n_trials": 0},
            "model": {"channels": 8},
            "train": {"max_epochs": EPOCHS, "patience": 10},
        },
    )
    run(["dvc", "repro", "tune"], project)
    return project


def fresh(project: Path) -> None:
    """No checkpoint left by an earlier test."""
    shutil.rmtree(project / ".runway/train", ignore_errors=True)


def client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")


def histories(project: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    mlflow = client(project)
    return {
        key: sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))
        for key in ("train/loss", "train/acc", "val/loss", "val/acc")
    }


def trained(project: Path) -> tuple[bytes, str]:
    """models/model.pt's bytes and the run that trained it."""
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    return (project / "models/model.pt").read_bytes(), run_id


@pytest.fixture(scope="module")
def reference(project) -> tuple[bytes, dict]:
    """An uninterrupted run: the model's bytes and its per-epoch metrics."""
    fresh(project)
    run(REPRO, project)
    model, run_id = trained(project)
    return model, histories(project, run_id)


def start(project: Path, env: dict | None = None) -> subprocess.Popen:
    """`dvc repro` of the train stage in its own process group, output merged, line by line."""
    return subprocess.Popen(
        REPRO,
        cwd=project,
        env=project_env() | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_until(process: subprocess.Popen, prefix: str) -> str:
    """The output up to and including the first line starting with ``prefix``."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    raise AssertionError(f"no line starting with {prefix!r} in:\n{''.join(seen)}")


def train_pid(project: Path) -> int:
    """The training process: the holder of the lock, a `python -m pipeline.stages.train`."""
    pid = int((project / ".runway/train.lock").read_text())
    assert b"pipeline.stages.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


def resumes_to_the_reference(project: Path, reference, run_id: str) -> None:
    """The next run continues ``run_id`` from the checkpoint left behind and ends as the
    uninterrupted run did, with dvc.lock recording its models/."""
    import torch

    checkpoint = torch.load(project / ".runway/train/last.ckpt", weights_only=True)
    epoch, step = checkpoint["epoch"], checkpoint["global_step"]
    # Written at the end of epoch `epoch` (0-based) by ModelCheckpoint, or where SIGTERM
    # stopped it: inside epoch `epoch`, or at its start (Lightning's own stop at an epoch end).
    first = epoch + 2 if step == STEPS * (epoch + 1) else epoch + 1
    result = run(REPRO, project)
    assert (
        f"[train] resuming the interrupted run from .runway/train/last.ckpt (saved in epoch "
        f"{epoch + 1}, after {step} optimizer steps)" in result.stdout
    )
    epochs = [line.split()[2] for line in result.stdout.splitlines() if "[train] epoch " in line]
    assert epochs == [f"{n}/{EPOCHS}" for n in range(first, EPOCHS + 1)]
    model, resumed = trained(project)
    assert resumed == run_id
    assert client(project).get_run(run_id).info.status == "FINISHED"
    assert model == reference[0]
    assert histories(project, run_id) == reference[1]
    assert [step for step, _ in reference[1]["val/loss"]] == list(range(EPOCHS))
    assert not (project / ".runway/train").exists()
    assert "up to date" in run(["dvc", "status", "train"], project).stdout


def test_kill_9_of_the_process_group_resumes_to_the_same_model(project, reference):
    import torch

    fresh(project)
    dvc = start(project)
    read_until(dvc, f"[train] epoch 2/{EPOCHS}")
    # Killed once epoch 2's checkpoint is written (just after its line): in epoch 3.
    last = project / ".runway/train/last.ckpt"
    while torch.load(last, weights_only=True)["epoch"] < 1:
        time.sleep(0.01)
    os.killpg(dvc.pid, signal.SIGKILL)
    dvc.wait()
    state = json.loads((project / ".runway/train/state.json").read_text())
    assert client(project).get_run(state["run_id"]).info.status == "RUNNING"  # no chance to end
    resumes_to_the_reference(project, reference, state["run_id"])


# dvc is killed: this helper adopts its orphans (PR_SET_CHILD_SUBREAPER) so that it can wait
# for the stage and report how it ended: the training process, or the shell between dvc and
# it, which exits with its status.
ORPHAN = r"""
import ctypes, json, os, signal, subprocess, sys, time
from pathlib import Path
project, shell = sys.argv[1], sys.argv[2]
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0
dvc = subprocess.Popen(["dvc", "repro", "-f", "-s", "train"], cwd=project,
    env=dict(os.environ, SHELL=shell), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    text=True, start_new_session=True)
out = []
for line in dvc.stdout:
    out.append(line)
    if line.startswith("[train] epoch 1/"):
        break
def parent_of(pid):  # -1 for a process that has gone (any may, while /proc is listed)
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1
def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
(pid,) = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
          and b"pipeline.stages.train" in cmdline(p.name)
          and dvc.pid in (parent_of(p.name), parent_of(parent_of(p.name)))]
parent = parent_of(pid)
stage = pid if parent == dvc.pid else parent
os.kill(dvc.pid, signal.SIGKILL)
killed = time.monotonic()
signal.alarm(120)
while True:
    child, status = os.waitpid(-1, 0)
    if child == stage:
        break
after = time.monotonic() - killed
out.extend(dvc.stdout)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "after": after,
                  "parent_is_dvc": parent == dvc.pid, "output": "".join(out)}))
"""


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_killing_dvc_alone_stops_the_stage_and_the_next_run_resumes(project, reference, shell):
    fresh(project)
    result = run([sys.executable, "-c", ORPHAN, str(project), shell], project)
    orphan = json.loads(result.stdout)
    # bash execs the command, so dvc is the stage's parent; dash stays in between.
    assert orphan["parent_is_dvc"] is (Path(shell).resolve().name != "dash")
    assert orphan["exit"] == 143, orphan["output"]
    assert orphan["after"] < 30
    lines = orphan["output"].splitlines()
    assert lines[-1] == "[train] terminated"
    (stopped,) = [line for line in lines if line.startswith("[train] interrupted in epoch")]
    assert stopped.endswith(
        "checkpoint saved to .runway/train/last.ckpt; run the stage again to resume"
    )
    state = json.loads((project / ".runway/train/state.json").read_text())
    assert client(project).get_run(state["run_id"]).info.status == "KILLED"
    if shell == "/bin/sh":  # one resume through dvc repro is enough for both
        resumes_to_the_reference(project, reference, state["run_id"])
    fresh(project)


def snapshot(project: Path) -> list[tuple[Path, int]]:
    """Every file under .runway/ and models/ with its modification time."""
    files = [*(project / ".runway").rglob("*"), *(project / "models").rglob("*")]
    return sorted((path, path.stat().st_mtime_ns) for path in files)


def all_runs(project: Path) -> int:
    mlflow = client(project)
    return len(mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()]))


def lock_released(project: Path) -> bool:
    """Whether the lock can be taken within a few seconds (a killed process with threads
    releases its files once the last thread has exited)."""
    for _ in range(100):
        try:
            with exclusive(project / ".runway/train.lock", ".runway/train"):
                return True
        except StageError:
            time.sleep(0.1)
    return False


def test_a_second_training_run_stops_at_once_naming_the_first(project):
    fresh(project)
    runs = all_runs(project)  # read now: the stopped holder may hold the store's write lock
    dvc = start(project)
    try:
        read_until(dvc, "[train] device")
        first = train_pid(project)
        os.kill(first, signal.SIGSTOP)  # it holds the lock and changes nothing meanwhile
        before = snapshot(project)
        second = run([sys.executable, "-m", "pipeline.stages.train"], project, check=False)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"[train] error: .runway/train is in use by another run (pid {first}, lock "
            f".runway/train.lock): wait for it to finish, or stop it with `kill {first}` and "
            "run again"
        ]
        assert snapshot(project) == before
    finally:
        os.killpg(dvc.pid, signal.SIGKILL)
        dvc.wait()
    assert lock_released(project)  # by the kernel, when the holder died
    assert all_runs(project) == runs + 1  # the first run's; the second made none
    fresh(project)
