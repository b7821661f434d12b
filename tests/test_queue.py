"""Queued DVC experiments (`dvc exp run --queue`, `dvc queue start -j 2`) log to the project's
own MLflow store, not to the temporary copies of the repository they run in."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import copy_project, edit_params, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("queue")]


def test_two_queued_experiments_run_side_by_side_into_the_project_store(tmp_path):
    import mlflow

    project = copy_project(tmp_path / "p")
    edit_params(project, {"tune": {"n_trials": 0}, "train": {"max_epochs": 2, "patience": 2}})
    run(["dvc", "repro"], project)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], project)
    run([*git, "commit", "-qm", "baseline"], project)
    for name, lr in (("lr-low", "0.001"), ("lr-high", "0.01")):
        queued = run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], project)
        assert f"Queued experiment '{name}'" in queued.stdout + queued.stderr
    run(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    run(["dvc", "queue", "stop"], project)  # its workers exit once the queue is empty
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = {
        exp["name"]: exp["data"]["params"]["params.yaml"]["data"]["train"]["lr"]
        for rev in shown
        for exp in (rev.get("experiments") or [])
        for exp in exp["revs"]
    }
    assert experiments == {"lr-low": 0.001, "lr-high": 0.01}
    client = mlflow.MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("runway-digits")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trained = {
        r.data.tags.get("dvc.exp_name"): r.data.params["train.lr"]
        for r in runs
        if r.info.run_name.startswith("train")
    }
    assert trained == {None: "0.003", "lr-low": "0.001", "lr-high": "0.01"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # Each queued run's model and artifacts are in the project's own mlruns/artifacts.
    for r in runs:
        if r.data.tags.get("dvc.exp_name"):
            assert r.info.artifact_uri.startswith(f"file://{project}/mlruns/artifacts/")
            assert client.list_artifacts(r.info.run_id)
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
