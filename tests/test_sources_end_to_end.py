"""Every data source through the whole pipeline: files in the real format, then `dvc repro`."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from tests.conftest import TINY, copy_project, edit_params, run
from tests.formats import write_cifar, write_image_folder, write_iris_csv, write_mnist

# source → (writer of its files under data/external/, data params, model params, classes)
CASES = {
    "mnist": (
        lambda d: write_mnist(d / "mnist", gz=True),
        {"source": "mnist"},  # the default location, data/external/mnist/
        {"name": "cnn"},
        10,
    ),
    "cifar10": (
        lambda d: write_cifar(d / "cifar10" / "cifar-10-binary.tar.gz", per_batch=100),
        {"source": "cifar10"},
        {"name": "cnn"},
        10,
    ),
    "image_folder": (
        lambda d: write_image_folder(d / "shapes", per_class=40, classes=3, size=24),
        {
            "source": "image_folder",
            "path": "data/external/shapes",
            "image_size": 16,
            "color": "rgb",
        },
        {"name": "resnet18"},
        3,
    ),
    "csv": (
        lambda d: write_iris_csv(d / "iris.csv"),
        {"source": "csv", "path": "data/external/iris.csv", "label_column": "species"},
        {"name": "mlp"},
        3,
    ),
}


# 600 digit images at 32×32×3 need more than TINY's 3 epochs to beat chance, and a model
# that does not beat chance is never promoted.
TRAIN = {"cifar10": {"max_epochs": 12, "patience": 12}}
# Tuning is the same code for every source; it runs here for the models no other end-to-end
# test tunes (resnet18 on RGB images, the mlp on a table); the cnn's study is test_end_to_end's.
# fashion-mnist is the mnist reader with other class names (tests/test_sources.py).
TRIALS = {"image_folder": 2, "csv": 2}


@pytest.mark.parametrize("source", list(CASES))
@pytest.mark.slow
def test_source_runs_end_to_end_to_a_registered_model(tmp_path, source):
    write, data, model, n_classes = CASES[source]
    project = copy_project(tmp_path)
    rows = write(project / "data" / "external")
    name = f"{source}-classifier"
    edit_params(
        project,
        {
            **TINY,
            "train": {**TINY["train"], **TRAIN.get(source, {})},
            "tune": {"n_trials": TRIALS.get(source, 0), "epochs": 2},
            "data": data,
            "model": model,
            "validate": {"min_per_class": 5},
            "register": {"model_name": name},
            "mlflow": {"experiment": f"runway-{source}"},
        },
    )
    start = time.monotonic()
    result = run(["dvc", "repro"], project)
    seconds = time.monotonic() - start
    assert "Running stage 'register'" in result.stdout

    manifest = json.loads((project / "data/raw/manifest.json").read_text())
    assert manifest["source"] == source and manifest["rows"] == rows
    assert len(manifest["classes"]) == n_classes
    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert summary["success"] and summary["rows_out"] + summary["rows_quarantined"] == rows

    spec = json.loads((project / "models/model.json").read_text())
    assert spec["architecture"] == model["name"]
    assert spec["image_shape"] == manifest["image_shape"]
    named = json.loads((project / "reports/evaluate/metrics.json").read_text())
    metrics = {k.removeprefix("test/"): v for k, v in named.items()}
    predictions = pd.read_csv(project / "reports/evaluate/predictions.csv")
    assert len(predictions) == summary["splits"]["test"]
    right = (predictions["actual"] == predictions["predicted"]).mean()
    assert metrics["accuracy"] == pytest.approx(right, abs=1e-12)

    register = json.loads((project / "reports/register.json").read_text())
    assert register["model_name"] == name and register["promoted"] is True
    assert set(register["aliases"]) == {"challenger", "champion"}

    # The registered champion takes the raw stored values and reproduces the test accuracy.
    import mlflow
    import numpy as np

    from pipeline.data.loader import to_tensors

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    try:
        champion = mlflow.pytorch.load_model(f"models:/{name}@champion", map_location="cpu")
    finally:
        mlflow.set_tracking_uri(None)
    test = pd.read_parquet(project / "data/prepared/test.parquet")
    x, y = to_tensors(test, manifest["image_shape"])
    predicted = champion(x.float()).argmax(1).numpy()
    assert np.mean(predicted == y.numpy()) == pytest.approx(metrics["accuracy"])
    print(  # shown with `pytest -s`: what each source's run produced
        f"\n{source}: {rows} rows, {summary['rows_quarantined']} quarantined, splits "
        f"{summary['splits']}, {model['name']} test accuracy {metrics['accuracy']:.3f}, "
        f"{name} v{register['version']} {register['aliases']}, dvc repro {seconds:.0f}s"
    )
