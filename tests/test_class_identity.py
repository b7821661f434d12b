"""A class is its name, through `dvc repro`: when a class folder is added or renamed (and the
others are renumbered), the registry compares models by class name, never promotes a model
that is no better than chance, and the validate gate names classes by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_project, edit_params, run
from tests.formats import digits_images

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("class_identity")]

IMAGES = Path("data/external/images")


def write_digit_folders(root: Path, n: int = 700) -> None:
    """``root/<digit>/*.png``: 8×8 grey digit images, one folder per digit '0'..'9'."""
    from PIL import Image

    images, labels = digits_images(n, 8, 1, 10)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"img_{i:04d}.png")


def write_blank_folder(folder: Path, n: int = 40) -> None:
    """Near-blank images (faint noise, so no two are duplicates)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 12, size=(8, 8), dtype=np.uint8)).save(
            folder / f"blank_{i:03d}.png"
        )


def record(project: Path) -> dict:
    return json.loads((project / "reports/register.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("classes"))
    write_digit_folders(project / IMAGES)
    edit_params(
        project,
        {
            "data": {"source": "image_folder", "path": str(IMAGES), "image_size": 8},
            "model": {"name": "mlp", "channels": 32, "dropout": 0.0},
            "validate": {"min_per_class": 5},
            "tune": {"n_trials": 0},
            "train": {"max_epochs": 15, "patience": 5, "lr": 0.005, "batch_size": 32},
            "register": {"model_name": "digit-folders"},
        },
    )
    run(["dvc", "repro"], project)
    return project


def test_a_new_or_renamed_class_never_lets_a_worse_model_through(project):
    first = record(project)
    assert first["promoted"] and first["reason"] == "no champion yet"
    champion_accuracy = first["test_metrics"]["test/accuracy"]
    assert champion_accuracy > 0.85
    # The registered model carries its class names.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    info = mlflow.models.get_model_info(f"models:/digit-folders/{first['version']}")
    assert info.metadata["class_names"] == [str(d) for d in range(10)]
    assert [c.name for c in info.signature.outputs.inputs] == [str(d) for d in range(10)]

    # '00_blank' sorts between '0' and '1', renumbering classes 1-9; '7' becomes 'seven'.
    write_blank_folder(project / IMAGES / "00_blank")
    (project / IMAGES / "7").rename(project / IMAGES / "seven")
    # A model that has barely trained: it must not replace the champion.
    edit_params(project, {"train": {"max_epochs": 1, "lr": 1e-6}})
    run(["dvc", "repro"], project)
    second = record(project)
    today = ["0", "00_blank", "1", "2", "3", "4", "5", "6", "8", "9", "seven"]
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert manifest["class_names"] == today
    comparison = second["comparison"]
    assert comparison["champion_version"] == first["version"]
    assert comparison["classes_compared"] == ["0", "1", "2", "3", "4", "5", "6", "8", "9"]
    assert comparison["champion_unknown_classes"] == ["00_blank", "seven"]
    # By class name, the champion scores on the classes it knows about what it scored before
    # (by output position it would score near 0.08 and anything would beat it).
    assert comparison["champion"] > 0.85
    assert not second["promoted"] and second["aliases"] == ["challenger"]
    assert f"champion v{first['version']}'s {comparison['champion']:.4f}" in second["reason"]
    assert "compared on the 9 of 11 classes the champion knows" in second["reason"]
    assert "it cannot predict '00_blank', 'seven'" in second["reason"]

    # Predictions and per-class results name the classes.
    predictions = (project / "reports/evaluate/predictions.csv").read_text().splitlines()
    assert predictions[0] == "sample_id,actual,predicted"
    assert {line.split(",")[1] for line in predictions[1:]} == set(today)
    per_class = json.loads((project / "reports/evaluate/per_class.json").read_text())
    assert list(per_class) == today and per_class["seven"]["index"] == 10


def test_the_gate_names_a_class_by_name(project):
    from PIL import Image

    extra = project / IMAGES / "extra"
    extra.mkdir()
    image, _ = digits_images(1, 8, 1, 10, offset=1000)  # not in any other folder
    Image.fromarray(image[0, 0]).save(extra / "one.png")
    try:
        result = run(["dvc", "repro"], project, check=False)
    finally:
        shutil.rmtree(extra)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "] error: " in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("[validate] error: ")
    assert "class 'extra' has 1 sample, fewer than validate.min_per_class=5" in errors[0]
