"""The generated MNIST- and CIFAR-scale sets of `make bench` (benchmarks/scale.py), written
small: the sources' own readers take them, with the images and labels as generated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.common import ROOT
from benchmarks.scale import (
    synthetic_digits,
    write_cifar_scale,
    write_image_folder_scale,
    write_mnist_scale,
)
from pipeline.config import DataParams
from pipeline.data.sources import SOURCES
from pipeline.data.table import features_of


def test_synthetic_digits_are_reproducible_varied_images():
    x, y = synthetic_digits(300, 28)
    again, labels = synthetic_digits(300, 28)
    assert x.dtype == np.uint8 and x.shape == (300, 1, 28, 28)
    assert np.array_equal(x, again) and np.array_equal(y, labels)
    assert set(y.tolist()) == set(range(10))
    assert len({image.tobytes() for image in x}) == 300  # never two alike
    rgb, _ = synthetic_digits(50, 32, channels=3, seed=1)
    assert rgb.shape == (50, 3, 32, 32)
    assert not np.array_equal(rgb[:, 0], rgb[:, 1])  # tinted: not grey


def test_the_mnist_reader_takes_the_generated_files(tmp_path):
    pixels = write_mnist_scale(tmp_path / "mnist", train=120, test=30)
    assert pixels == 150 * 28 * 28
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    loaded = SOURCES["mnist"](DataParams(source="mnist", path=str(tmp_path / "mnist")))
    table = loaded["table"]
    x, y = synthetic_digits(150, 28)
    assert loaded["image_shape"] == [1, 28, 28]
    assert np.array_equal(table[features_of(table)].to_numpy(), x.reshape(150, -1))
    assert np.array_equal(table["label"].to_numpy(), y)


def test_the_cifar_reader_takes_the_generated_archive(tmp_path):
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    assert write_cifar_scale(archive, per_batch=20) == 120 * 3 * 32 * 32
    loaded = SOURCES["cifar10"](DataParams(source="cifar10", path=str(archive)))
    table = loaded["table"]
    x, y = synthetic_digits(120, 32, channels=3, seed=1)
    assert loaded["image_shape"] == [3, 32, 32]
    assert np.array_equal(table[features_of(table)].to_numpy(), x.reshape(120, -1))
    assert np.array_equal(table["label"].to_numpy(), y)


def test_the_image_folder_reader_takes_the_generated_folder(tmp_path):
    import pyarrow as pa

    assert write_image_folder_scale(tmp_path / "images", n=40, size=24) == 40 * 3 * 24 * 24
    folder = str(tmp_path / "images")
    params = DataParams(source="image_folder", path=folder, image_size=24, color="rgb")
    loaded = SOURCES["image_folder"](params)
    table = pa.concat_tables(loaded["tables"]).to_pandas()
    x, y = synthetic_digits(40, 24, channels=3, seed=2)
    # ingest's order: class folders sorted by name ("0" … "9"), then files by name (i)
    order = sorted(range(40), key=lambda i: (str(y[i]), i))
    assert loaded["class_names"] == [str(c) for c in sorted(set(y.tolist()), key=str)]
    assert np.array_equal(table[features_of(table)].to_numpy(), x[order].reshape(40, -1))
    assert [loaded["class_names"][label] for label in table["label"]] == [str(y[i]) for i in order]


def test_the_repro_rows_read_the_train_stages_epoch_lines_and_the_trials_table(
    digits_prepared, tmp_path, capsys
):
    import pandas as pd

    from benchmarks.scale_repro import EPOCH_LINE, study_seconds
    from pipeline.config import ModelParams, TrainParams
    from pipeline.training import EpochLine, fit

    hp = TrainParams(max_epochs=2, batch_size=256, accelerator="cpu")
    fit(hp, ModelParams(channels=4), digits_prepared, [EpochLine()])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[train] epoch ")]
    assert len(lines) == 2
    assert EPOCH_LINE.findall(out) == [line.rsplit("(", 1)[1].rstrip("s)") for line in lines]

    trials = pd.DataFrame(
        {
            "number": [0, 1, 2],
            "datetime_start": ["2026-01-01 10:00:00", "2026-01-01 10:00:30", "2026-01-01 10:01:00"],
            "datetime_complete": [
                "2026-01-01 10:00:30",
                "2026-01-01 10:03:15.5",
                "2026-01-01 10:02:00",
            ],
        }
    )
    trials.to_csv(tmp_path / "trials.csv", index=False)
    assert study_seconds(tmp_path / "trials.csv") == (195.5, 3)


@pytest.mark.slow
def test_the_scale_comparison_runs_each_set_through_the_gate_and_restores_the_data(tmp_path):
    """scale.run on small sets: each set's ingest and validate run as stages in the scratch
    project, two rows a set, three more for the image folder's splits memory-mapped, and the
    project's own data section comes back at the end."""
    from functools import partial

    import yaml

    from benchmarks import scale
    from benchmarks.common import Context

    sets = (
        ("mnist", "MNIST-scale", partial(write_mnist_scale, train=600, test=100), {}),
        ("cifar10", "CIFAR-scale", partial(write_cifar_scale, per_batch=100), {}),
        (
            "image_folder",
            "Image folder",
            partial(write_image_folder_scale, n=500, size=24),
            {"path": scale.IMAGE_FOLDER, "image_size": 24, "color": "rgb"},
        ),
    )
    ctx = Context(scratch=tmp_path)
    rows = scale.run(ctx, sets=sets)
    project = ctx.cache["scale_project"]
    pixels = {
        "mnist": 700 * 28 * 28,
        "cifar10": 600 * 3 * 32 * 32,
        "image_folder": 500 * 3 * 24 * 24,
    }
    rows, mapped = rows[:6], rows[6:]
    assert [r["metric"] for r in rows] == [
        f"{label}: {what}"
        for source, label, _, _ in sets
        for what in (
            "ingest + validate wall time",
            f"memory grown with the data / uint8 pixels ({pixels[source] / 2**20:.0f} MB)",
        )
    ]
    assert [r["goal"] for r in rows] == ["<= 30 s", "<= 3x", "<= 60 s", "<= 3x", "—", "<= 3x"]
    assert [r["metric"] for r in mapped] == [
        "Image folder: train + val loaded for training, memory-mapped from disk / in memory: "
        "anonymous memory added",
        "Image folder: one shuffled pass of batch-128 gathers, memory-mapped / in memory",
        "Image folder: loading memory-mapped, the first time (making the .npy files) / later",
        "Image folder: validate, raw table memory-mapped from disk / in memory: anonymous "
        "memory at the peak",
        "Image folder: validate, raw table memory-mapped from disk / in memory: wall time",
    ]
    assert [r["goal"] for r in mapped] == ["<= 0.5x", "<= 1.10x", "—", "—", "—"]
    assert len(mapped[1]["round_ratios"]) == 5 and mapped[0]["reference"] > 0
    # the splits' memory-mapped files, made by the first mapped load (and kept by the second)
    files = sorted(p.name.split("-")[0] for p in (project / ".runway/prepared").glob("*.npy"))
    assert files == ["train", "val"]
    assert [r.get("informational", False) for r in rows[::2]] == [False, False, True]
    report = ctx.report["scale"]
    assert list(report) == ["digits", "mnist", "cifar10", "image_folder"]
    for source, stages in report.items():
        assert list(stages) == ["ingest", "validate"], source
        for stage, cost in stages.items():
            assert cost["wall_s"] > 0 and cost["peak_rss_mb"] > 50, (source, stage)
    for (source, *_), (wall, memory) in zip(
        sets, zip(rows[::2], rows[1::2], strict=True), strict=True
    ):
        costs = report[source]
        walls = costs["ingest"]["wall_s"] + costs["validate"]["wall_s"]
        # each rounded to 0.1 s: the sum of the rounded walls is within one step of the row
        assert round(abs(wall["ours"] - walls), 6) <= 0.1, source
        grown = max(costs[s]["peak_rss_mb"] - report["digits"][s]["peak_rss_mb"] for s in costs)
        assert abs(memory["ours"] - grown) <= 1, source  # kB rounded to MB on either side
    # the last set's data is what validate checked: its manifest is the image folder's
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert (manifest["source"], manifest["rows"], manifest["image_shape"]) == (
        "image_folder",
        500,
        [3, 24, 24],
    )
    data = yaml.safe_load((project / "params.yaml").read_text())["data"]
    assert data == yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
