"""Ingest's handling of awkward inputs, each through ``dvc repro`` in one shared project copy:
oversized images, symbolic links out of an image folder, CIFAR-format sets with their own
class list and CSV files with another delimiter; the tests that ingest images or a CSV file
also check the exact summary line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import DataParams
from pipeline.data import cifar
from tests.conftest import copy_project, edit_params, run
from tests.formats import (
    CIFAR10_NAMES,
    digits_images,
    write_black_png,
    write_cifar,
    write_image_folder,
    write_iris_csv,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ingest_inputs")]

DATA = "data/external/t"  # every test's input lives here (data/external is an ingest dep)
IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("ingest-inputs") / "p")


@pytest.fixture
def project(shared: Path):
    """The shared copy with the original params and no test data or ingest output."""
    params = (shared / "params.yaml").read_text()
    yield shared
    (shared / "params.yaml").write_text(params)
    for rel in (DATA, "data/raw", "data/prepared"):
        path = shared / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


def repro(project: Path, stage: str = "ingest") -> subprocess.CompletedProcess:
    return run(["dvc", "repro", "--force", stage], project, check=False)


def error_line(result: subprocess.CompletedProcess, stage: str = "ingest") -> str:
    """The stage exited 1 with exactly one error line, which is returned (DVC merges the
    stage's stderr into its stdout and exits 255 itself)."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"failed to run: python -m pipeline.stages.{stage}, exited with 1" in output, output
    errors = [line for line in output.splitlines() if "] error: " in line]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return errors[0]


def succeeds(result: subprocess.CompletedProcess) -> list[str]:
    """Exit 0; the ingest lines of the output."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("[ingest]")]


def manifest(project: Path) -> dict:
    return json.loads((project / "data/raw/manifest.json").read_text())


def image_folder(project: Path, per_class: int = 10) -> Path:
    """Two classes of RGB digits under DATA/images, read as grey 32×32 images."""
    root = project / DATA / "images"
    write_image_folder(root, per_class=per_class, classes=2, size=20)
    edit_params(project, {"data": {"source": "image_folder", "path": f"{DATA}/images"}})
    return root


# --- Images over Pillow's decompression-bomb limits -----------------------------------------


def test_image_over_the_bomb_limit_is_named_with_the_other_bad_files(project):
    root = image_folder(project)
    side = 13_400  # 179,560,000 pixels: just over Pillow's error limit, 2 × MAX_IMAGE_PIXELS
    bomb = write_black_png(root / "zero/bomb.png", side, side)
    assert bomb.stat().st_size < 100_000
    (root / "one/broken.png").write_bytes(b"not an image")
    limit = 2 * Image.MAX_IMAGE_PIXELS
    assert error_line(repro(project)) == (
        f"[ingest] error: 2 of 22 image file(s) under {DATA}/images cannot be decoded: "
        f"{DATA}/images/one/broken.png (UnidentifiedImageError: cannot identify image file "
        f"'{DATA}/images/one/broken.png'); {DATA}/images/zero/bomb.png (DecompressionBombError: "
        f"Image size ({side * side} pixels) exceeds limit of {limit} pixels, could be "
        "decompression bomb DOS attack.). Fix or remove them."
    )
    assert not (project / "data/raw").exists()


def test_image_between_the_warning_and_error_sizes_is_decoded_and_named_once(project):
    root = image_folder(project)
    write_black_png(root / "zero/large.png", 9_500, 9_500)  # 90,250,000 pixels: 1x to 2x
    result = repro(project)
    assert "DecompressionBombWarning" not in result.stdout + result.stderr
    lines = succeeds(result)
    assert [line for line in result.stdout.splitlines() if "decompression" in line] == [
        "[ingest] 1 image(s) over Pillow's decompression-bomb warning size "
        f"({Image.MAX_IMAGE_PIXELS} pixels) decoded: {DATA}/images/zero/large.png (9500×9500)"
    ]
    assert lines[-1] == (
        "[ingest] wrote data/raw/samples.parquet: 21 samples, 2 classes, images 1×32×32 uint8"
    )


# --- Symbolic links -----------------------------------------------------------------------


def test_symlinks_out_of_an_image_folder_are_refused_by_name(project, tmp_path):
    root = image_folder(project)
    outside = tmp_path / "elsewhere"
    write_image_folder(outside, per_class=2, classes=2, size=20)
    secret = sorted((outside / "zero").iterdir())[0]
    (root / "zero/secret.png").symlink_to(secret)  # a file link
    (root / "two").symlink_to(outside / "one", target_is_directory=True)  # a class folder
    (root / "one/more").symlink_to(outside / "zero", target_is_directory=True)  # below a class
    real = Path(os.path.realpath(outside))
    assert error_line(repro(project)) == (
        f"[ingest] error: 3 symbolic link(s) under {DATA}/images lead outside it: "
        f"{DATA}/images/two -> {real}/one; {DATA}/images/one/more -> {real}/zero; "
        f"{DATA}/images/zero/secret.png -> {real}/zero/{secret.name}. "
        "Copy the files into the folder or remove the links."
    )
    assert not (project / "data/raw").exists()

    # Links that stay inside the folder are read as what they point to.
    for link in ("zero/secret.png", "two", "one/more"):
        (root / link).unlink()
    first = sorted((root / "zero").iterdir())[0]
    (root / "one/also.png").symlink_to(f"../zero/{first.name}")
    (root / "three").symlink_to("one", target_is_directory=True)
    succeeds(repro(project))
    ones = len(list((root / "one").iterdir()))  # also.png included
    assert manifest(project)["rows"] == 20 + 1 + ones
    assert manifest(project)["class_names"] == ["one", "three", "zero"]


# --- CIFAR-format sets with their own classes ------------------------------------------------


def test_cifar_format_with_two_classes_passes_the_validate_gate(project):
    archive = project / DATA / "cifar-10-binary.tar.gz"
    rows = write_cifar(archive, per_batch=50, names=["cat", "dog"])
    edit_params(project, {"data": {"source": "cifar10", "path": DATA}})
    succeeds(repro(project, "validate"))
    info = manifest(project)
    assert (info["rows"], info["classes"], info["class_names"]) == (rows, [0, 1], ["cat", "dog"])
    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert summary["success"] is True

    # Without batches.meta.txt: CIFAR-10's ten names.
    write_cifar(archive, per_batch=50, names=None, classes=2)
    loaded = cifar.load(DataParams(source="cifar10", path=str(archive)))
    assert loaded["class_names"] == list(CIFAR10_NAMES) and loaded["classes"] == list(range(10))


def test_cifar_label_outside_the_listed_classes_names_the_file_and_record(project):
    archive = project / DATA / "cifar-10-binary.tar.gz"
    write_cifar(archive, per_batch=50, names=["cat", "dog"], classes=3)
    edit_params(project, {"data": {"source": "cifar10", "path": DATA}})
    _, labels = digits_images(50, 32, 3, classes=3)
    outside = np.flatnonzero(labels == 2)
    first = int(outside[0])
    assert error_line(repro(project)) == (
        f"[ingest] error: {DATA}/cifar-10-binary.tar.gz: data_batch_1.bin: record {first + 1} "
        f"(byte offset {first * 3073}) has label 2, but batches.meta.txt lists 2 classes "
        f"(labels 0 to 1); {len(outside)} record(s) of this file are outside them"
    )


# --- CSV delimiters -------------------------------------------------------------------------


def csv_source(project: Path, name: str, **data) -> Path:
    edit_params(
        project,
        {"data": {"source": "csv", "path": f"{DATA}/{name}", "label_column": "species", **data}},
    )
    return project / DATA / name


@pytest.mark.parametrize("sep, stage", [(";", "validate"), ("\t", "ingest")], ids=["semi", "tab"])
def test_csv_with_another_delimiter_is_detected(project, sep, stage):
    write_iris_csv(csv_source(project, "iris.csv"), sep=sep)
    lines = succeeds(repro(project, stage))
    assert f"[ingest] csv delimiter {sep!r} (detected)" in lines
    assert lines[-1] == (
        "[ingest] wrote data/raw/samples.parquet: 150 samples, 3 classes, 4 features"
    )
    info = manifest(project)
    assert info["feature_names"] == IRIS and info["image_shape"] == [4]
    assert info["class_names"] == ["setosa", "versicolor", "virginica"]


def test_csv_delimiter_from_params_is_used_as_given(project):
    write_iris_csv(csv_source(project, "iris.csv", delimiter="|"), sep="|")
    assert "[ingest] csv delimiter '|' (data.delimiter)" in succeeds(repro(project))
    assert manifest(project)["feature_names"] == IRIS


def test_csv_with_an_ambiguous_delimiter_asks_for_data_delimiter(project):
    path = csv_source(project, "t.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x,y;z,species\n" + "".join(f"{i},{i};{i},a\n" for i in range(40)))
    assert error_line(repro(project)) == (
        f"[ingest] error: {DATA}/t.csv: cannot tell the column delimiter: ',' (3 columns) and "
        "';' (2 columns) each split the first 41 line(s) evenly; set data.delimiter to the "
        "right one"
    )


def test_a_large_image_folder_is_decoded_in_threads_in_order_with_progress(tmp_path, capsys):
    """1,200 images of three sizes: each lands in its own row, as decoding it alone gives, with
    a progress bar (on stderr) and the thread count in the summary line."""
    from pipeline.data import image_folder

    rng = np.random.default_rng(0)
    expected = []
    for i in range(1200):
        name = ("a", "b", "c")[i % 3]
        side = (12, 16, 24)[i % 3]
        path = tmp_path / "images" / name / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(path)
    params = DataParams(source="image_folder", path=str(tmp_path / "images"), image_size=16)
    _, files = image_folder.list_images(tmp_path / "images")
    expected = [image_folder.decode(path, 16, "L")[0].reshape(-1) for path, _ in files]
    loaded = image_folder.load(params)
    table = pa.concat_tables(loaded["tables"]).to_pandas()
    assert loaded["class_names"] == ["a", "b", "c"]
    assert table["label"].tolist() == [label for _, label in files]
    pixels = table[[c for c in table.columns if c.startswith("px_")]].to_numpy()
    assert np.array_equal(pixels, np.stack(expected))
    out, err = capsys.readouterr()
    assert "[ingest] decoding: 100%" in err and "1200/1200" in err
    threads = image_folder.decoders()
    assert "[ingest] decoded 1200 images in 3 classes (" in out and f"{threads} threads)" in out
