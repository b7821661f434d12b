"""Data-parallel training with Lightning's DDP strategy: two CPU processes (gloo)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import IRIS, copy_project, edit_params, project_env, run
from tests.formats import write_iris_csv

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]

# Same data, epochs and samples per optimizer step: one process at batch 64, two at 32 each.
DIGITS = {"tune": {"n_trials": 0}, "train": {"max_epochs": 8, "patience": 8}}


def store(project: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")


def train_runs(project: Path, experiment: str):
    client = store(project)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=100)
    return [r for r in runs if r.info.run_name.startswith("train")]


def accuracy(project: Path) -> float:
    return json.loads((project / "reports/evaluate/metrics.json").read_text())["test/accuracy"]


def test_two_processes_train_one_run_with_identical_replicas(tmp_path):
    project = copy_project(tmp_path / "p")
    edit_params(project, {**DIGITS, "train": {**DIGITS["train"], "batch_size": 64}})
    run(["dvc", "repro", "evaluate"], project)
    alone = accuracy(project)
    (one,) = train_runs(project, "runway-digits")
    assert one.data.params["train.world_size"] == "1"
    assert one.data.params["train.global_batch_size"] == "64"
    assert "ddp.replicas_identical" not in one.data.tags

    ddp = {"batch_size": 32, "devices": 2, "strategy": "ddp"}
    edit_params(project, {"train": {**DIGITS["train"], **ddp}})
    out = run(["dvc", "repro", "evaluate"], project).stdout
    assert out.count("[train] epoch 1/8 ") == 1  # one process prints
    runs = train_runs(project, "runway-digits")
    assert len(runs) == 2  # the second process logged nothing
    two = next(r for r in runs if r.info.run_id != one.info.run_id)
    assert two.info.status == "FINISHED"
    assert two.data.params["train.devices"] == "2"
    assert two.data.params["train.strategy"] == "ddp"
    assert two.data.params["train.world_size"] == "2"
    assert two.data.params["train.global_batch_size"] == "64"
    assert two.data.params["train.effective_lr"] == two.data.params["train.lr"]
    assert two.data.tags["ddp.replicas_identical"] == "true"
    # Sent by the first process once each epoch's checkpoint is written: one point per epoch.
    history = store(project).get_metric_history(two.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(DIGITS["train"]["max_epochs"]))
    assert json.loads((project / "models/run.json").read_text())["run_id"] == two.info.run_id
    assert abs(accuracy(project) - alone) <= 0.01, (alone, accuracy(project))


def test_a_dead_process_fails_the_stage_and_keeps_the_previous_model(tmp_path):
    import psutil

    project = copy_project(tmp_path / "p")
    write_iris_csv(project / "data/external/iris.csv")
    edit_params(project, {**IRIS, "tune": {"n_trials": 0}})
    run(["dvc", "repro", "train"], project)
    before = (project / "models/model.pt").read_bytes()
    # About 0.1 s an epoch: killed at epoch 20, it would run for 8 s more.
    long = {"max_epochs": 100, "patience": 100, "devices": 2, "strategy": "ddp"}
    edit_params(project, {"train": long})
    stage = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "train"],
        cwd=project,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stage.stdout), daemon=True)
    reader.start()
    try:
        second = None
        deadline = time.monotonic() + 180
        # In the middle of training: epochs done (and checkpointed) by both processes.
        while not any("[train] epoch 20/100" in line for line in lines):
            assert time.monotonic() < deadline and stage.poll() is None, "".join(lines)
            time.sleep(0.2)
        for proc in psutil.Process(stage.pid).children(recursive=True):
            try:
                if proc.environ().get("LOCAL_RANK") == "1":
                    second = proc
            except psutil.Error:
                continue
        assert second is not None, "no second training process"
        second.send_signal(signal.SIGKILL)
        stage.wait(timeout=120)
        reader.join(timeout=10)
        out = "".join(lines)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode != 0
    assert "Traceback" not in out
    # The first process's next collective fails (one line), and Lightning's watch of the
    # other processes kills it (SIGKILL), saying why; either may come first, and the kill
    # may land before our line is printed.
    ours = [line for line in out.splitlines() if line.startswith("[train] error:")]
    lightnings = [line for line in out.splitlines() if "Forcefully terminating" in line]
    assert len(ours) <= 1 and len(lightnings) <= 1 and ours + lightnings, out[-3000:]
    for line in ours:
        assert line.startswith(
            "[train] error: another process of the data-parallel training (2 processes) stopped: "
        )
        assert line.endswith("; nothing was kept")
    for line in lightnings:
        assert f"terminated with code {-signal.SIGKILL}" in line
    assert (project / "models/model.pt").read_bytes() == before
    # Nothing lost: the next run resumes the same MLflow run from the last epoch's checkpoint.
    again = run(["dvc", "repro", "train"], project).stdout
    assert "[train] resuming the interrupted run" in again, again
    runs = train_runs(project, "runway-iris")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    finished = json.loads((project / "models/run.json").read_text())["run_id"]
    resumed = next(r for r in runs if r.info.run_id == finished)
    assert resumed.data.tags["ddp.replicas_identical"] == "true"
    assert resumed.data.metrics["epochs_trained"] == 100
