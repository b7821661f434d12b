"""Writers for small data sets in the exact on-disk formats the sources read.

The pixels are scikit-learn's handwritten digits (real images, bundled, offline), scaled to
0–255 and resized to each format's image size, so a model trained on them learns something.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def digits_images(n: int, size: int, channels: int = 1, classes: int = 10, offset: int = 0):
    """``n`` digit images as uint8 N×C×size×size and their labels: images ``offset`` to
    ``offset + n`` of one fixed shuffle, so calls with disjoint ranges share no image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.random.default_rng(0).permutation(np.flatnonzero(digits.target < classes))
    picks = keep[offset : offset + n]
    assert len(picks) == n, f"only {len(keep)} digits of classes < {classes}"
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    for i, index in enumerate(picks):
        small = (digits.images[index] * (255 / 16)).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
        for c in range(channels):  # tint each channel differently so RGB is not grey
            images[i, c] = (big * (1.0 - 0.2 * c)).astype(np.uint8)
    return images, digits.target[picks].astype(np.int64)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    array = np.asarray(array)
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(folder: Path, n_train: int = 240, n_test: int = 80, gz: bool = True) -> int:
    """The four MNIST files (28×28 digits) in ``folder``; returns the number of samples."""
    x_train, y_train = digits_images(n_train, 28)
    x_test, y_test = digits_images(n_test, 28, offset=n_train)
    write_idx(folder / "train-images-idx3-ubyte", x_train[:, 0], gz)
    write_idx(folder / "train-labels-idx1-ubyte", y_train.astype(np.uint8), gz)
    write_idx(folder / "t10k-images-idx3-ubyte", x_test[:, 0], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", y_test.astype(np.uint8), gz)
    return n_train + n_test


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: 1 label byte, then 3,072 pixel bytes (R, G, B planes)."""
    records = np.concatenate(
        [labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1
    )
    return records.tobytes()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def write_cifar(
    path: Path,
    per_batch: int = 60,
    names: Sequence[str] | None = CIFAR10_NAMES,
    classes: int | None = None,
) -> int:
    """A ``cifar-10-binary.tar.gz`` with the real member layout; returns the sample count.

    ``names`` go to ``batches.meta.txt`` (None: no meta file); the records hold digits of
    ``classes`` classes (default: as many as there are names, else 10)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = classes or (len(names) if names else 10)
    batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    with tarfile.open(path, "w:gz") as archive:
        for i, name in enumerate(batches):
            images, labels = digits_images(per_batch, 32, 3, classes, offset=i * per_batch)
            add_member(archive, f"cifar-10-batches-bin/{name}", cifar_records(images, labels))
        if names is not None:
            meta = "\n".join([*names, ""])
            add_member(archive, "cifar-10-batches-bin/batches.meta.txt", meta.encode())
        add_member(archive, "cifar-10-batches-bin/readme.html", b"<html></html>")
    return per_batch * len(batches)


def write_image_folder(
    root: Path, per_class: int = 30, classes: int = 3, size: int = 20, rgb: bool = True
) -> int:
    """``root/<class>/*.png|jpg``: digits 0..classes-1 as image files of ``size`` pixels."""
    from PIL import Image

    images, labels = digits_images(per_class * classes, size, 3 if rgb else 1, classes)
    names = ["zero", "one", "two", "three", "four"][:classes]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        hwc = image.transpose(1, 2, 0) if rgb else image[0]
        suffix = ".jpg" if i % 5 == 0 else ".png"  # both formats, as real folders have
        Image.fromarray(hwc).save(folder / f"img_{i:04d}{suffix}")
    return len(images)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_black_png(path: Path, width: int, height: int) -> Path:
    """An all-black 1-bit PNG of ``width`` × ``height``: a real image, a few kilobytes on disk
    (13,400 × 13,400 pixels take 22 kB), written row by row without holding it in memory."""
    stream = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the bits of one row
    body = b"".join(stream.compress(row) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grey
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body + stream.flush())
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_iris_csv(path: Path, sep: str = ",") -> int:
    """scikit-learn's bundled iris table with its species names as the label column."""
    from sklearn.datasets import load_iris

    iris = load_iris(as_frame=True)
    table = iris.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    table["species"] = iris.target_names[iris.target]
    table = table.drop(columns="target")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, sep=sep)
    return len(table)
