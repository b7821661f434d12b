"""The generated MNIST- and CIFAR-scale sets of `make bench` (benchmarks/scale.py), written
small: the sources' own readers take them, with the images and labels as generated."""

from __future__ import annotations

import numpy as np

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
