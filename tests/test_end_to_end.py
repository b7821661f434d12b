"""The whole pipeline, for real: `dvc repro` on a copy of the project with tiny params."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import READS_ENV
from tests.conftest import TINY, copy_project, edit_params, run
from tests.test_dvc_yaml import unlisted_reads

STAGES = ["params", "ingest", "validate", "tune", "train", "evaluate", "register"]

# The tests share one `dvc repro` (a module fixture): keep them on one test worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("digits_end_to_end")]


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("runway"))
    edit_params(project, TINY)
    # Each stage records which params keys it reads (see test_dvc_yaml.py). MLflow's pyfunc
    # loader is set to the GPU, as it is by default on a GPU host, where it cannot load a
    # network exported on the CPU: train's input-example check must not depend on it.
    env = {READS_ENV: str(project / ".params-read"), "MLFLOW_DEFAULT_PREDICTION_DEVICE": "cuda"}
    first = run(["dvc", "repro"], project, env=env)
    return project, first.stdout + first.stderr


def test_every_stage_reads_only_params_its_dvc_yaml_entry_lists(project):
    project, _ = project
    for name in STAGES[1:]:  # the params stage validates the whole file and reads nothing
        reads = set(json.loads((project / ".params-read" / f"{name}.json").read_text()))
        assert reads, name
        assert unlisted_reads(name, reads) == [], f"stage {name!r} reads params dvc.yaml omits"


def mlflow_client(project):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")


def test_repro_writes_every_output(project):
    project, output = project
    assert ran_stages(output) == STAGES
    assert "Failed to validate serving input example" not in output
    for path in (
        "data/raw/samples.parquet",
        "data/raw/manifest.json",
        "data/prepared/train.parquet",
        "data/prepared/val.parquet",
        "data/prepared/test.parquet",
        "reports/validation/summary.json",
        "reports/validation/data_docs/index.html",
        "reports/tune/best_params.json",
        "reports/tune/optimization_history.png",
        "models/model.pt",
        "models/run.json",
        "reports/evaluate/confusion_matrix.png",
        "reports/evaluate/predictions.csv",
        "reports/register.json",
    ):
        assert (project / path).is_file(), path
    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())
    assert set(metrics) == {
        "test/accuracy",
        "test/precision_macro",
        "test/recall_macro",
        "test/f1_macro",
    }
    # Even three epochs on the digits are far above chance (10 %).
    assert metrics["test/accuracy"] > 0.8
    manifest = json.loads((project / "data/raw/manifest.json").read_text())
    assert manifest["rows"] == 1797 and manifest["source"] == "digits"
    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert summary["success"] and sum(summary["splits"].values()) == 1797


def test_mlflow_holds_validation_tuning_training_and_the_registry(project):
    project, _ = project
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("runway-digits")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("stage"), []).append(r)
    assert set(by_stage) == {"validate", "tune", "train"}
    assert all(r.info.status == "FINISHED" for r in runs)

    (validate,) = by_stage["validate"]
    artifacts = [a.path for a in client.list_artifacts(validate.info.run_id, "validation")]
    assert "validation/data_docs" in artifacts
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    raw = next(o for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert validate.data.tags["data.raw_dvc_md5"] == raw["md5"]  # the data it checked

    tune_runs = by_stage["tune"]
    parents = [r for r in tune_runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in tune_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    import optuna

    study = optuna.load_study(
        study_name=parents[0].data.tags["optuna.study"],
        storage=f"sqlite:///{project}/mlruns/optuna.db",
    )
    states = {str(t.number): t.state.name for t in study.trials}
    for t in trials:  # each trial run says what the study says of that trial
        assert t.data.tags["optuna.trial_state"] == states[t.data.tags["optuna.trial"]]
        assert {"train.lr", "train.batch_size", "train.optimizer"} <= set(t.data.params)

    (train,) = by_stage["train"]
    # One name per thing: trials, the tune summary, best_params.json and the training run
    # name a value by its params.yaml path, and the training run logs where each came from.
    best = json.loads((project / "reports/tune/best_params.json").read_text())
    assert (
        sorted(best)
        == sorted(study.best_trial.params)
        == sorted(
            ["train.lr", "train.batch_size", "train.optimizer", "train.weight_decay"]
            + ["model.channels", "model.dropout"]
        )
    )
    parent = parents[0]
    assert {k: parent.data.params[k] for k in best} == {k: str(v) for k, v in best.items()}
    assert {k: train.data.params[k] for k in best} == {k: str(v) for k, v in best.items()}
    assert parent.data.tags["optuna.best_trial"] == str(study.best_trial.number)
    assert parent.data.metrics["tune/best_val/loss"] == study.best_value
    assert "best_val/loss" not in parent.data.metrics  # that is a training run's kept epoch
    for t in trials:
        assert set(t.data.params) - {"params.tuned", "params.defaults"} <= set(train.data.params)
    params_yaml = yaml.safe_load((project / "params.yaml").read_text())
    # The validate and tune runs log their own sections by the same dotted names.
    split = params_yaml["validate"]["split"]
    assert {k: validate.data.params[f"validate.split.{k}"] for k in split} == {
        k: str(v) for k, v in split.items()
    }
    assert validate.data.params["params.defaults"] == "none"  # params.yaml lists every key
    space = params_yaml["tune"]["search_space"]
    assert parent.data.params["tune.search_space.lr"] == str(space["lr"])
    assert parent.data.params["tune.n_trials"] == str(params_yaml["tune"]["n_trials"])
    assert train.data.params["train.max_epochs"] == str(params_yaml["train"]["max_epochs"])
    assert sorted(train.data.params["params.tuned"].split(", ")) == sorted(best)
    requested = {k for k in train.data.params if k.startswith("requested.")}
    differs = {
        f"requested.{k}"
        for k, v in best.items()
        if v != params_yaml[k.split(".")[0]][k.split(".")[1]]
    }
    assert requested == differs
    with tempfile.TemporaryDirectory() as where:
        sources = client.download_artifacts(train.info.run_id, "params.json", where)
        rows = {r["key"]: r for r in json.loads(Path(sources).read_text())}
    assert {k for k, r in rows.items() if r["source"] == "tuned"} == set(best)
    assert rows["train.patience"] == {
        "key": "train.patience",
        "requested": params_yaml["train"]["patience"],
        "effective": params_yaml["train"]["patience"],
        "source": "params",
    }
    tags, metrics = train.data.tags, train.data.metrics
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared = next(o for o in lock["stages"]["validate"]["outs"] if o["path"] == "data/prepared")
    assert tags["data.dvc_md5"] == prepared["md5"]
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert tags["git.commit"] == commit
    assert tags["git.dirty"] == "true"  # params.yaml was shrunk after the commit
    assert {"train/loss", "val/loss", "val/acc", "test/accuracy", "test/f1_macro"} <= set(metrics)
    history = client.get_metric_history(train.info.run_id, "val/loss")
    assert len(history) == metrics["epochs_trained"] >= 2  # one point per epoch
    evaluated = [a.path for a in client.list_artifacts(train.info.run_id, "evaluation")]
    assert "evaluation/confusion_matrix.png" in evaluated
    # Per-class figures are a table and a plot, not one metric per class.
    assert {"evaluation/per_class.csv", "evaluation/per_class.png"} <= set(evaluated)
    assert not [m for m in metrics if m.startswith("test/") and "class" in m]
    assert sorted(m for m in metrics if m.startswith("test/")) == [
        "test/accuracy",
        "test/f1_macro",
        "test/precision_macro",
        "test/recall_macro",
    ]
    per_class = json.loads((project / "reports/evaluate/per_class.json").read_text())
    table = (project / "reports/evaluate/per_class.csv").read_text().splitlines()
    assert table[0] == "class,precision,recall,f1,support"
    assert (
        [row.split(",")[0] for row in table[1:]] == list(per_class) == [str(d) for d in range(10)]
    )
    assert [int(row.split(",")[4]) for row in table[1:]] == [
        m["support"] for m in per_class.values()
    ]
    assert client.search_logged_models([experiment.experiment_id])

    record = json.loads((project / "reports/register.json").read_text())
    champion = client.get_model_version_by_alias("digits-cnn", "champion")
    assert int(champion.version) == record["version"] and champion.run_id == train.info.run_id
    assert "challenger" in champion.aliases


def test_champion_loads_and_predicts_raw_pixels(project):
    project, _ = project
    import mlflow
    import pandas as pd
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    model = mlflow.pytorch.load_model("models:/digits-cnn@champion", map_location="cpu")
    test = pd.read_parquet(project / "data/prepared/test.parquet")
    x = torch.tensor(test.filter(like="px_").to_numpy("float32")).reshape(-1, 1, 8, 8)
    accuracy = (model(x).argmax(1).numpy() == test["label"].to_numpy()).mean()
    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["test/accuracy"])
    # Loaded as a pyfunc (what `mlflow models serve` does) on the device a GPU host would set.
    served = mlflow.pyfunc.load_model("models:/digits-cnn@champion", model_config={"device": "cpu"})
    scores = served.predict(x[:7].numpy())
    assert scores.shape == (7, 10)
    assert (scores.argmax(1) == model(x[:7]).argmax(1).numpy()).all()
    # The exported network moves to another device whole (meta stands in for a GPU here).
    moved = model.to("meta")(x[:3].to("meta"))
    assert moved.device.type == "meta" and moved.shape == (3, 10)


def test_second_repro_is_a_no_op_and_metrics_commands_work(project):
    project, _ = project
    again = run(["dvc", "repro"], project)
    assert ran_stages(again.stdout + again.stderr) == []
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    # DVC shows the metrics under the names MLflow has them (test/accuracy, not test.accuracy).
    data = shown[""]["data"]["reports/evaluate/metrics.json"]["data"]  # "": the workspace
    assert set(data) == {
        "test/accuracy",
        "test/f1_macro",
        "test/precision_macro",
        "test/recall_macro",
    }
    diff = run(["dvc", "metrics", "diff", "--json"], project).stdout
    assert "reports/evaluate/metrics.json" in diff  # new against HEAD, which has none
    run(["dvc", "plots", "show", "--out", "plots_html"], project)
    assert (project / "plots_html/index.html").is_file()


def test_rerunning_tune_resumes_the_same_study(project):
    project, output = project
    first = next(line for line in output.splitlines() if line.startswith("[tune] study"))
    again = run(["python", "-m", "pipeline.stages.tune"], project).stdout
    second = next(line for line in again.splitlines() if line.startswith("[tune] study"))
    assert first.split(":")[0] == second.split(":")[0]  # same study name
    assert "2 trial(s) already done; running 0 more" in second
    run(["dvc", "commit", "-f", "tune"], project)  # keep the workspace in step with dvc.lock


def test_register_param_change_reruns_only_register(project):
    project, _ = project
    before = json.loads((project / "reports/register.json").read_text())
    edit_params(project, {"register": {"min_delta": 0.5}})
    out = run(["dvc", "repro"], project)
    assert ran_stages(out.stdout + out.stderr) == ["params", "register"]
    after = json.loads((project / "reports/register.json").read_text())
    # Same run: same version, still champion, no duplicate registration.
    assert after["version"] == before["version"]
    assert "champion" in after["aliases"]
    summary = run(["runway", "summary"], project).stdout
    assert "digits-cnn version" in summary and "127.0.0.1:5000" in summary
