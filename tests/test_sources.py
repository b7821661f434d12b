"""Each data source reads its real on-disk format and refuses broken files by name."""

from __future__ import annotations

import gzip
import hashlib
import tarfile

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataParams, ParamsError, parse_params
from pipeline.data import cifar, idx
from pipeline.data.download import fetch
from pipeline.data.table import read_table
from pipeline.io import StageError
from pipeline.stages.ingest import ingest, write_raw
from tests.formats import (
    add_member,
    cifar_records,
    digits_images,
    idx_bytes,
    write_cifar,
    write_idx,
    write_image_folder,
    write_iris_csv,
    write_mnist,
)


def load(tmp_path, **data):
    """Ingest ``data`` as the stage does (into ``tmp_path/raw``): the table read back from the
    file written, and the manifest."""
    manifest = write_raw(*ingest(DataParams(**data)), out_dir=tmp_path / "raw")
    return read_table(tmp_path / "raw" / "samples.parquet"), manifest.to_dict()


# --- MNIST / Fashion-MNIST (IDX) --------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    assert path.name.endswith(".gz") == gz
    read = idx.read_idx(path)
    assert read.dtype == np.uint8 and np.array_equal(read, array)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(idx.read_idx(write_idx(tmp_path / "f-idx2", floats)), floats)


def test_mnist_folder_becomes_the_canonical_table(tmp_path):
    n = write_mnist(tmp_path / "mnist", gz=True)
    table, info = load(tmp_path, source="mnist", path=str(tmp_path / "mnist"))
    assert len(table) == n and table.shape[1] == 2 + 28 * 28
    assert table["px_0"].dtype == np.uint8 and info["dtype"] == "uint8"
    assert info["image_shape"] == [1, 28, 28]
    # Every pixel and label as written, train files first, then t10k.
    x_train, y_train = digits_images(240, 28)
    x_test, y_test = digits_images(80, 28, offset=240)
    pixels = np.concatenate([x_train, x_test]).reshape(n, -1)
    assert np.array_equal(table.iloc[:, 2:].to_numpy(), pixels)
    assert table["label"].tolist() == [*y_train, *y_test]
    assert len(info["files"]) == 4 and all(v.startswith("sha256:") for v in info["files"].values())
    _, fashion = load(tmp_path, source="fashion-mnist", path=str(tmp_path / "mnist"))
    assert fashion["class_names"][0] == "T-shirt/top" and fashion["class_names"][9] == "Ankle boot"


def test_idx_problems_name_the_file(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder, gz=False)
    images = folder / "train-images-idx3-ubyte"
    raw = images.read_bytes()

    images.write_bytes(raw[:-100])  # truncated
    with pytest.raises(StageError, match=r"train-images-idx3-ubyte: dimensions .*truncated"):
        load(tmp_path, source="mnist", path=str(folder))

    images.write_bytes(b"\x12\x34" + raw[2:])  # bad magic
    with pytest.raises(StageError, match="train-images-idx3-ubyte: not an IDX file"):
        load(tmp_path, source="mnist", path=str(folder))

    images.write_bytes(raw)
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))  # 3 labels for 80 images
    with pytest.raises(StageError, match="t10k-labels-idx1-ubyte: expected 80 labels"):
        load(tmp_path, source="mnist", path=str(folder))

    labels.unlink()
    with pytest.raises(StageError, match=r"t10k-labels-idx1-ubyte\[.gz\] not found.*download"):
        load(tmp_path, source="mnist", path=str(folder))

    gz = write_idx(tmp_path / "g" / "x-idx1-ubyte", np.zeros(4, dtype=np.uint8), gz=True)
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros(4, dtype=np.uint8)))[:-6])  # cut short
    with pytest.raises(StageError, match="x-idx1-ubyte.gz: cannot read"):
        idx.read_idx(gz)


def test_download_checks_md5_and_falls_back_to_the_next_mirror(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    payload = gzip.compress(idx_bytes(np.arange(5, dtype=np.uint8)))
    (good / "labels.gz").write_bytes(payload)
    corrupted = payload[:10] + bytes([payload[10] ^ 0xFF]) + payload[11:]
    (bad / "labels.gz").write_bytes(corrupted)
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "external"
    got = fetch("labels.gz", md5, [bad.as_uri() + "/", good.as_uri() + "/"], dest)
    assert got.read_bytes() == payload
    assert sorted(p.name for p in dest.iterdir()) == ["labels.gz"]  # no temp file left
    with pytest.raises(StageError, match=r"could not download other.gz: .*bad/other.gz"):
        fetch("other.gz", md5, [bad.as_uri()], dest)
    with pytest.raises(StageError, match=f"MD5 .*, expected {md5}"):
        fetch("labels.gz", md5, [bad.as_uri()], tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / "labels.gz").exists()


def test_download_true_fetches_the_four_files_then_reads_them(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    n = write_mnist(mirror, gz=True)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    info = {**idx.DATASETS["mnist"], "mirrors": [mirror.as_uri() + "/"], "md5": md5}
    monkeypatch.setitem(idx.DATASETS, "mnist", info)
    target = tmp_path / "external" / "mnist"
    table, _ = load(tmp_path, source="mnist", path=str(target), download=True)
    assert len(table) == n and sorted(p.name for p in target.iterdir()) == sorted(md5)
    (target / "t10k-labels-idx1-ubyte.gz").unlink()  # only missing files are fetched again
    (mirror / "train-images-idx3-ubyte.gz").unlink()
    assert len(load(tmp_path, source="mnist", path=str(target), download=True)[0]) == n


def test_mnist_download_uses_the_published_checksums(tmp_path):
    assert idx.DATASETS["mnist"]["md5"]["train-images-idx3-ubyte.gz"] == (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    )
    assert cifar.MD5 == "c32a1d4ab5d03f1284b67883e8d87530"
    with pytest.raises(ParamsError, match="data.download: source 'csv' has nothing to download"):
        parse_params({"data": {"source": "csv", "path": "x.csv", "download": True}})


# --- CIFAR-10 binary ---------------------------------------------------------------------


def test_cifar_archive_and_extracted_folder_read_the_same(tmp_path):
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    n = write_cifar(archive, per_batch=20)
    from_archive, info = load(tmp_path, source="cifar10", path=str(archive.parent))
    assert len(from_archive) == n and info["image_shape"] == [3, 32, 32]
    assert info["class_names"][0] == "airplane" and info["dtype"] == "uint8"
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    from_folder, _ = load(tmp_path, source="cifar10", path=str(extracted))
    pd.testing.assert_frame_equal(from_archive, from_folder)
    # Channels are planes: pixel 0 of the red plane is px_0, of the green plane px_1024.
    images, labels = digits_images(20, 32, channels=3)
    first = from_archive.iloc[0]
    assert first["label"] == labels[0]
    assert first["px_0"] == images[0, 0, 0, 0] and first["px_1024"] == images[0, 1, 0, 0]


@pytest.mark.parametrize(
    "name, kind",
    [
        ("../escape.bin", "file"),
        ("/abs/data_batch_1.bin", "file"),
        ("cifar-10-batches-bin/link", "symlink"),
        ("cifar-10-batches-bin/hard", "hardlink"),
    ],
)
def test_cifar_archive_with_unsafe_members_is_refused(tmp_path, name, kind):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    images, labels = digits_images(2, 32, channels=3)
    batch = cifar_records(images, labels)
    with tarfile.open(archive, "w:gz") as tar:
        for b in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            add_member(tar, f"cifar-10-batches-bin/{b}", batch)
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "cifar-10-batches-bin/test_batch.bin"
            tar.addfile(info)
        else:
            add_member(tar, name, b"x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(StageError, match=f"refusing .*{name.split('/')[-1]}"):
        load(tmp_path, source="cifar10", path=str(archive))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert not (tmp_path.parent / "escape.bin").exists()


def test_cifar_truncated_batch_and_missing_members(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    images, labels = digits_images(2, 32, channels=3)
    with tarfile.open(archive, "w:gz") as tar:
        for b in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            data = cifar_records(images, labels)
            add_member(
                tar, f"cifar-10-batches-bin/{b}", data[:-7] if b == "test_batch.bin" else data
            )
    with pytest.raises(StageError, match=r"test_batch.bin: 6139 bytes is not a whole number"):
        load(tmp_path, source="cifar10", path=str(archive))
    with tarfile.open(archive, "w:gz") as tar:
        add_member(tar, "cifar-10-batches-bin/data_batch_1.bin", cifar_records(images, labels))
    with pytest.raises(StageError, match="archive lacks data_batch_2.bin"):
        load(tmp_path, source="cifar10", path=str(archive))
    archive.write_bytes(b"not a tar file at all")
    with pytest.raises(StageError, match="not a readable tar archive"):
        load(tmp_path, source="cifar10", path=str(archive))
    with pytest.raises(StageError, match="empty: not found.*cifar-10-binary.tar.gz.*download"):
        load(tmp_path, source="cifar10", path=str(tmp_path / "empty"))


# --- Image folder -------------------------------------------------------------------------


@pytest.mark.parametrize("color, channels", [("grey", 1), ("rgb", 3)])
def test_image_folder_resizes_and_converts(tmp_path, color, channels):
    n = write_image_folder(tmp_path / "images", per_class=10, classes=3, size=20)
    (tmp_path / "images" / "zero" / "notes.txt").write_text("not an image, skipped")
    table, info = load(
        tmp_path, source="image_folder", path=str(tmp_path / "images"), image_size=12, color=color
    )
    assert len(table) == n and info["image_shape"] == [channels, 12, 12]
    assert table.shape[1] == 2 + channels * 144 and table["px_0"].dtype == np.uint8
    assert info["class_names"] == ["one", "two", "zero"]  # sorted folder names
    # The first row is the first file of the first sorted class folder, decoded and resized
    # exactly as Pillow does it.
    from PIL import Image

    first = sorted((tmp_path / "images" / "one").glob("*.*"))[0]
    mode = "L" if color == "grey" else "RGB"
    image = Image.open(first).convert(mode).resize((12, 12), Image.Resampling.BILINEAR)
    expected = np.asarray(image).reshape(12, 12, channels).transpose(2, 0, 1).ravel()
    assert np.array_equal(table.iloc[0, 2:].to_numpy(np.uint8), expected)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"this is text, not a PNG", "UnidentifiedImageError"),
        ("truncated", "OSError"),
    ],
)
def test_undecodable_images_are_named_not_read_as_black(tmp_path, content, problem):
    root = tmp_path / "images"
    write_image_folder(root, per_class=10, classes=2, size=16)
    victim = sorted((root / "one").glob("*.png"))[0]
    if content == "truncated":
        content = victim.read_bytes()[:60]
    victim.write_bytes(content)
    with pytest.raises(StageError, match=rf"1 of 20 image file\(s\).*{victim.name} \({problem}"):
        load(tmp_path, source="image_folder", path=str(root))


def test_an_image_folder_is_written_a_chunk_at_a_time_with_the_same_table(tmp_path, monkeypatch):
    """30 images, 7 per chunk: five row groups written as decoded, holding the table that
    ingesting the folder in one chunk gives, and the same manifest but for the checksum."""
    import pyarrow.parquet as pq

    from pipeline.data import image_folder

    n = write_image_folder(tmp_path / "images", per_class=10, classes=3, size=20)
    data = dict(source="image_folder", path=str(tmp_path / "images"), image_size=12)
    whole, whole_info = load(tmp_path / "whole", **data)
    monkeypatch.setattr(image_folder, "CHUNK_ROWS", 1)
    monkeypatch.setattr(image_folder, "CHUNK_BYTES", 7 * 12 * 12)
    chunked, chunked_info = load(tmp_path / "chunked", **data)
    groups = pq.ParquetFile(tmp_path / "chunked" / "raw" / "samples.parquet").metadata
    sizes = [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]
    assert (n, sizes) == (30, [7, 7, 7, 7, 2])
    pd.testing.assert_frame_equal(chunked, whole)
    assert chunked_info["checksum"] != whole_info["checksum"]
    assert {**chunked_info, "checksum": None} == {**whole_info, "checksum": None}
    assert (chunked_info["rows"], chunked_info["dtype"]) == (30, "uint8")


def test_undecodable_images_in_several_chunks_are_all_named_and_nothing_is_written(
    tmp_path, monkeypatch
):
    from pipeline.data import image_folder

    root = tmp_path / "images"
    write_image_folder(root, per_class=10, classes=2, size=16)
    files = [path for path, _ in image_folder.list_images(root)[1]]  # in ingest's order
    for victim in (files[1], files[17]):  # chunks 1 and 5 of 5
        victim.write_bytes(b"not an image")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "samples.parquet").write_text("the last good table")
    monkeypatch.setattr(image_folder, "CHUNK_ROWS", 1)
    monkeypatch.setattr(image_folder, "CHUNK_BYTES", 4 * 16 * 16)
    with pytest.raises(StageError) as raised:
        load(tmp_path, source="image_folder", path=str(root), image_size=16)
    assert str(raised.value) == (
        f"2 of 20 image file(s) under {root} cannot be decoded: "
        f"{files[1]} (UnidentifiedImageError: cannot identify image file {str(files[1])!r}); "
        f"{files[17]} (UnidentifiedImageError: cannot identify image file {str(files[17])!r})."
        " Fix or remove them."
    )
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["samples.parquet"]
    assert (tmp_path / "raw" / "samples.parquet").read_text() == "the last good table"


def test_decoding_stops_when_the_writer_stops_taking_chunks(tmp_path, monkeypatch):
    """The writer stops after the first chunk (^C, a full disk): the images queued for the
    chunk after it are not decoded, and no decoding thread is left. Decoding a file takes
    50 ms here, so the next chunk (20 images, 2 threads) is still queued when it stops."""
    import threading
    import time

    from pipeline.data import image_folder

    write_image_folder(tmp_path / "images", per_class=100, classes=2, size=16)
    decoded, decode = [], image_folder.decode

    def slow_decode(*args):
        time.sleep(0.05)
        decoded.append(args[0])
        return decode(*args)

    monkeypatch.setattr(image_folder, "decode", slow_decode)
    monkeypatch.setattr(image_folder, "CHUNK_ROWS", 20)
    monkeypatch.setattr(image_folder, "CHUNK_BYTES", 1)
    monkeypatch.setattr(image_folder, "decoders", lambda: 2)
    params = DataParams(source="image_folder", path=str(tmp_path / "images"), image_size=16)
    tables = image_folder.load(params)["tables"]
    assert next(tables).num_rows == 20
    tables.close()
    assert len(decoded) < 30  # the first chunk, and at most the few the threads had begun
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]


def test_write_raw_closes_the_chunks_when_writing_fails(tmp_path):
    """A chunk the writer refuses (here, another schema) stops ingest, and the chunks'
    generator is closed at once, so that an image folder's decoding stops with it."""
    from pipeline.data.table import arrow_table

    closed = []

    def chunks():
        try:
            yield arrow_table(np.zeros((4, 3), dtype=np.uint8), np.arange(4))
            yield arrow_table(np.zeros((4, 5), dtype=np.uint8), np.arange(4))
            yield arrow_table(np.zeros((4, 3), dtype=np.uint8), np.arange(4))
        finally:
            closed.append(True)

    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="schema") as raised:
        write_raw(chunks(), {"source": "digits"}, out_dir=tmp_path / "raw")
    # write_raw closed it: its frame, in the traceback kept here, still holds the generator
    assert raised.value is not None and closed == [True]
    assert list((tmp_path / "raw").iterdir()) == []


def test_ingesting_an_image_folder_holds_a_few_chunks_not_the_whole_data(tmp_path, monkeypatch):
    """6,000 grey 32×32 images (6 MB decoded) in chunks of 128: what Python and NumPy hold at
    the peak stays under half the decoded pixels (about 2.3 MB: two chunks in flight and the
    futures of their images). Decoding the folder in one chunk peaks at nine times them."""
    import concurrent.futures  # noqa: F401  (imported first: their own memory is not the data's)
    import tracemalloc

    import pyarrow.parquet  # noqa: F401
    import tqdm  # noqa: F401
    from PIL import Image

    from pipeline.data import image_folder

    rng = np.random.default_rng(0)
    for i in range(6000):
        path = tmp_path / "images" / ("a", "b")[i % 2] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    Image.open(path).load()  # Pillow's plugins, loaded on the first open
    pixels = 6000 * 32 * 32
    monkeypatch.setattr(image_folder, "CHUNK_ROWS", 1)
    monkeypatch.setattr(image_folder, "CHUNK_BYTES", 128 * 32 * 32)
    tables, info = ingest(DataParams(source="image_folder", path=str(tmp_path / "images")))
    tracemalloc.start()
    try:
        manifest = write_raw(tables, info, out_dir=tmp_path / "raw")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest.rows == 6000
    assert peak < pixels / 2, f"peak {peak} B for {pixels} B of pixels"


def test_image_folder_layout_problems(tmp_path):
    with pytest.raises(StageError, match="image folder not found"):
        load(tmp_path, source="image_folder", path=str(tmp_path / "nowhere"))
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    with pytest.raises(StageError, match=r"found 1 class folder\(s\)"):
        load(tmp_path, source="image_folder", path=str(root))
    (root / "dogs").mkdir()
    with pytest.raises(StageError, match="cats: class folder has no PNG or JPEG files"):
        load(tmp_path, source="image_folder", path=str(root))


# --- CSV ----------------------------------------------------------------------------------


def test_csv_with_named_labels(tmp_path):
    path = tmp_path / "iris.csv"
    n = write_iris_csv(path)
    table, info = load(tmp_path, source="csv", path=str(path), label_column="species")
    assert len(table) == n and info["image_shape"] == [4] and info["pixel_range"] is None
    assert info["class_names"] == ["setosa", "versicolor", "virginica"]
    assert info["feature_names"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert table["px_0"].dtype == np.float32
    assert (table.groupby("label").size() == 50).all()
    first = pd.read_csv(path).iloc[0]
    assert table.iloc[0]["px_2"] == pytest.approx(first["petal_length"])


def test_csv_problems_name_the_line_and_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    with pytest.raises(StageError, match=r"t.csv: column 'b' must be numeric; line 3: 'oops'"):
        load(tmp_path, source="csv", path=str(path))
    path.write_text("a,b,label\n1,2,x\n3,4,z\n")
    with pytest.raises(StageError, match=r"line 3: 'z' is not one of data.classes \['x', 'y'\]"):
        load(tmp_path, source="csv", path=str(path), classes=["x", "y"])
    with pytest.raises(StageError, match=r"no label column 'target'.*\['a', 'b', 'label'\]"):
        load(tmp_path, source="csv", path=str(path), label_column="target")
    path.write_text("")
    with pytest.raises(StageError, match="t.csv: the file is empty"):
        load(tmp_path, source="csv", path=str(path))
    path.write_text("a,b,label\n")
    with pytest.raises(StageError, match="has a header but no rows"):
        load(tmp_path, source="csv", path=str(path))


def test_csv_numeric_labels_sort_numerically_and_empty_cells_reach_validate(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,label\n1,10\n2,9\n,10\n4,2\n")
    table, info = load(tmp_path, source="csv", path=str(path))
    assert info["class_names"] == ["2", "9", "10"]
    assert table["label"].tolist() == [2, 1, 2, 0]
    assert np.isnan(table["px_0"].iloc[2])  # quarantined by validate, with the reason
