"""`runway server migrate`: a local store's history onto a real team server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import IRIS, copy_project, edit_params, run
from tests.formats import write_iris_csv
from tests.team import client_environ, team_server

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("migrate")]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """A project that worked alone: two trained models of iris (one tuned study), registered
    as `iris` versions 1 and 2, and the second also as `iris-b` version 1; aliases set."""
    import mlflow

    project = copy_project(tmp_path_factory.mktemp("alone") / "p")
    write_iris_csv(project / "data/external/iris.csv")
    edit_params(project, IRIS)
    run(["dvc", "repro"], project)
    edit_params(project, {"train": {"max_epochs": 6, "patience": 6}})
    run(["dvc", "repro"], project)
    edit_params(project, {"register": {"model_name": "iris-b"}})
    run(["dvc", "repro"], project)
    client = mlflow.MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")
    client.set_registered_model_alias("iris", "first", "1")
    return project, client


def test_history_models_and_aliases_move_to_the_server(alone, tmp_path):
    import mlflow
    import numpy as np

    from pipeline.data.loader import load_prepared

    project, local = alone
    with team_server() as team:
        out = run(["runway", "server", "migrate"], project, env=team.client).stdout
        assert "[migrate] done: 1 experiment(s), " in out or "[migrate] done: 2 experiment" in out
        assert team.client["MLFLOW_TRACKING_PASSWORD"] not in out
        with client_environ(team.client):
            server = mlflow.MlflowClient(team.client["MLFLOW_TRACKING_URI"])
            before = local.get_experiment_by_name("runway-iris")
            after = server.get_experiment_by_name("runway-iris")
            old = {r.info.run_id: r for r in local.search_runs([before.experiment_id])}
            new = {
                r.data.tags["runway.migrated_from"]: r
                for r in server.search_runs([after.experiment_id])
            }
            assert set(new) == set(old)
            for run_id, was in old.items():
                now = new[run_id]
                assert now.info.run_name == was.info.run_name
                assert now.info.status == was.info.status
                assert (now.info.start_time, now.info.end_time) == (
                    was.info.start_time,
                    was.info.end_time,
                )
                assert now.data.params == was.data.params
                assert now.data.metrics == was.data.metrics
                for key in was.data.metrics:
                    history = [
                        (m.step, m.value, m.timestamp)
                        for m in server.get_metric_history(now.info.run_id, key)
                    ]
                    assert sorted(history) == sorted(
                        (m.step, m.value, m.timestamp)
                        for m in local.get_metric_history(run_id, key)
                    )
                parent = was.data.tags.get("mlflow.parentRunId")
                if parent:
                    assert now.data.tags["mlflow.parentRunId"] == new[parent].info.run_id
                listed = sorted(a.path for a in local.list_artifacts(run_id))
                assert sorted(a.path for a in server.list_artifacts(now.info.run_id)) == listed
            assert any("mlflow.parentRunId" in r.data.tags for r in old.values())  # trials
            for name in ("iris", "iris-b"):
                versions = local.search_model_versions(f"name='{name}'")
                copied = server.search_model_versions(f"name='{name}'")
                assert sorted(str(v.version) for v in copied) == sorted(
                    str(v.version) for v in versions
                )
                assert {
                    k: str(v) for k, v in server.get_registered_model(name).aliases.items()
                } == {k: str(v) for k, v in local.get_registered_model(name).aliases.items()}
                for v in copied:
                    was = next(x for x in versions if str(x.version) == str(v.version))
                    assert new[was.run_id].info.run_id == v.run_id
            assert str(server.get_registered_model("iris").aliases["first"]) == "1"
            # The champion on the server loads and scores its test accuracy again.
            champion = server.get_model_version_by_alias("iris", "champion")
            model = mlflow.pyfunc.load_model("models:/iris@champion")
            x, y = load_prepared(project / "data/prepared", splits=("test",)).tensors["test"]
            scores = np.asarray(model.predict(x.float().numpy()))
            accuracy = float((scores.argmax(axis=1) == y.numpy()).mean())
            logged = server.get_run(champion.run_id).data.metrics["test/accuracy"]
            assert accuracy == pytest.approx(logged, abs=1e-9)
        again = run(["runway", "server", "migrate"], project, env=team.client).stdout
        assert " 0 run(s) copied (" in again and " 0 new version(s) (" in again
        with client_environ(team.client):
            assert len(server.search_runs([after.experiment_id])) == len(old)


def test_wrong_credentials_say_so_in_one_line(alone):
    project, _ = alone
    with team_server() as team:
        uri = team.client["MLFLOW_TRACKING_URI"]
        wrong = {**team.client, "MLFLOW_TRACKING_PASSWORD": "not-the-password-0000"}
        result = run(["runway", "server", "migrate"], project, env=wrong, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"[migrate] error: cannot use the server {uri}: 401 "
        "Unauthorized: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (runway "
        "server start wrote them to .runway/server/client.env)"
    ]
    assert "not-the-password-0000" not in result.stdout + result.stderr
    assert json.loads((Path(project) / "reports/register.json").read_text())
