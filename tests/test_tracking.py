"""MLflow conventions: runs always end with the right status; metrics are finite."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline import tracking
from pipeline.io import Terminated


def _status(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(run_id).info.status


def test_runs_end_finished_failed_or_killed(mlflow_store):
    experiment = tracking.setup("unit")
    assert (mlflow_store / "mlruns/mlflow.db").is_file()
    with tracking.run(experiment, "ok", {"stage": "t"}) as ok:
        pass
    assert _status(ok.info.run_id) == "FINISHED"

    with pytest.raises(RuntimeError), tracking.run(experiment, "boom", {}) as failed:
        raise RuntimeError("boom")
    assert _status(failed.info.run_id) == "FAILED"

    with pytest.raises(Terminated), tracking.run(experiment, "term", {}) as killed:
        os.kill(os.getpid(), signal.SIGTERM)
    assert _status(killed.info.run_id) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_experiment_artifacts_live_under_mlruns(mlflow_store):
    import mlflow

    experiment = mlflow.get_experiment(tracking.setup("unit"))
    assert experiment.artifact_location == (mlflow_store / "mlruns/artifacts").as_uri()
    assert tracking.setup("unit") == experiment.experiment_id  # found, not recreated


def test_non_finite_metrics_are_refused():
    assert tracking.finite_metrics({"a": 1}) == {"a": 1.0}
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            tracking.finite_metrics({"val/loss": bad})


def test_dvc_hash_of_a_directory_is_order_independent(tmp_path):
    (tmp_path / "d/sub").mkdir(parents=True)
    (tmp_path / "d/b.txt").write_text("b")
    (tmp_path / "d/sub/a.txt").write_text("a")
    first = tracking.dvc_hash(tmp_path / "d")
    assert first.endswith(".dir")
    (tmp_path / "d/b.txt").write_text("changed")
    assert tracking.dvc_hash(tmp_path / "d") != first
    assert tracking.dvc_hash(tmp_path / "d/sub/a.txt") == "0cc175b9c0f1b6a831c399e269772661"


def test_git_info_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert tracking.git_info() == {"git.commit": "unknown", "git.dirty": "unknown"}


@pytest.mark.parametrize("preset", [None, "3"])
def test_async_metrics_buffer_while_logging_and_are_all_stored_when_it_ends(
    mlflow_store, monkeypatch, preset
):
    import mlflow

    if preset is None:
        monkeypatch.delenv(tracking.ASYNC_BUFFERING, raising=False)
    else:
        monkeypatch.setenv(tracking.ASYNC_BUFFERING, preset)
    experiment = tracking.setup("unit")
    with tracking.run(experiment, "async", {}) as active:
        run_id = active.info.run_id
        with tracking.async_metrics():
            # MLflow's buffering interval, or the one the environment chose.
            assert os.environ[tracking.ASYNC_BUFFERING] == (preset or "1")
            for step in range(5):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step, synchronous=False)
        assert os.environ.get(tracking.ASYNC_BUFFERING) == preset  # put back
        history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [
            (step, 1.0 / (step + 1)) for step in range(5)
        ]
