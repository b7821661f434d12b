"""MNIST and Fashion-MNIST in their original IDX format (gzipped or not).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in row-major order, big-endian. The four
files (train/t10k × images/labels) are read from ``data.path`` (default
``data/external/<source>/``), or fetched there from the usual mirrors when ``data.download`` is
true. Train and test files are pooled; the pipeline re-splits every sample by its content hash.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.config import DataParams
from pipeline.data.download import fetch
from pipeline.data.table import file_sha256, make_table
from pipeline.io import StageError

IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# The most data an IDX header may claim; a header claiming more is refused before anything is
# allocated or decompressed. The largest IDX set in common use, EMNIST ByClass, has 547 MB of
# training images.
MAX_IDX_BYTES = 4 * 2**30
# Decompressed bytes read per call.
CHUNK = 16 * 2**20
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DATASETS = {
    "mnist": {
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ],
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "class_names": [str(i) for i in range(10)],
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "class_names": [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
    },
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (``.gz`` is decompressed as it is read); errors name the file and what
    is wrong.

    The header is checked first, then exactly the number of bytes it describes is read into one
    preallocated array, so memory stays at the size of the data even when a small ``.gz`` file
    expands to gigabytes; data beyond that size, or less of it, is an error.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            return _read_idx(path, stream)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise StageError(f"{path}: cannot read: {exc}") from None


def _read_idx(path: Path, stream: BinaryIO) -> np.ndarray:
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_TYPES:
        raise StageError(f"{path}: not an IDX file (bad magic number {magic.hex() or 'none'})")
    dtype, ndim = IDX_TYPES[magic[2]], magic[3]
    if ndim == 0:
        raise StageError(f"{path}: IDX header declares no dimensions")
    header = stream.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise StageError(f"{path}: IDX header truncated ({4 + len(header)} bytes)")
    dims = list(struct.unpack(f">{ndim}I", header))
    size = math.prod(dims) * dtype.itemsize  # Python integers: no overflow
    if size > MAX_IDX_BYTES:
        raise StageError(
            f"{path}: dimensions {dims} claim {size:,} bytes of data, more than the "
            f"{MAX_IDX_BYTES:,} an IDX file may hold (corrupt header?)"
        )
    if path.suffix != ".gz" and (found := path.stat().st_size - 4 - 4 * ndim) != size:
        raise _size_mismatch(path, dims, size, found)
    try:
        data = np.empty(size // dtype.itemsize, dtype=dtype.newbyteorder("="))
    except MemoryError:
        raise StageError(
            f"{path}: dimensions {dims} need {size:,} bytes, more memory than is free"
        ) from None
    buffer = memoryview(data.view(np.uint8))
    filled = 0
    while filled < size:
        n = stream.readinto(buffer[filled : filled + CHUNK])
        if not n:
            raise _size_mismatch(path, dims, size, filled)
        filled += n
    if stream.read(1):
        raise _size_mismatch(path, dims, size, None)
    if not dtype.isnative:
        data.byteswap(inplace=True)
    return data.reshape(dims)


def _size_mismatch(path: Path, dims: list[int], size: int, found: int | None) -> StageError:
    """``found``: the bytes of data the file holds (None: more than ``size``, not counted)."""
    if found is not None and found < size:
        problem = f"found {found:,} (truncated or corrupt file)"
    else:
        count = "more" if found is None else f"{found:,}"
        problem = f"found {count} (data after the end: trailing bytes or a corrupt file)"
    return StageError(f"{path}: dimensions {dims} need {size:,} bytes of data, {problem}")


def locate(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def load(params: DataParams) -> dict:
    """The pooled train and test images with their labels, as the canonical table."""
    info = DATASETS[params.source]
    folder = params.location()
    if params.download:
        for filename, md5 in info["md5"].items():
            if locate(folder, filename.removesuffix(".gz")) is None:
                fetch(filename, md5, info["mirrors"], folder)
    images, labels, files = [], [], {}
    for image_name, label_name in FILES.values():
        paths = [locate(folder, image_name), locate(folder, label_name)]
        if None in paths:
            missing = [n for n, p in zip((image_name, label_name), paths, strict=True) if not p]
            raise StageError(
                f"{folder}: {', '.join(f'{m}[.gz]' for m in missing)} not found; put the IDX "
                "files there, set data.path, or set data.download: true"
            )
        x, y = read_idx(paths[0]), read_idx(paths[1])
        if x.ndim != 3:
            raise StageError(f"{paths[0]}: expected N × height × width images, got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise StageError(
                f"{paths[1]}: expected {len(x)} labels to match {paths[0].name}, "
                f"got shape {y.shape}"
            )
        if images and x.shape[1:] != images[0].shape[1:]:
            raise StageError(
                f"{paths[0]}: images are {x.shape[1]}×{x.shape[2]}, the train images "
                f"{images[0].shape[1]}×{images[0].shape[2]}"
            )
        images.append(x)
        labels.append(y)
        files.update({str(p): f"sha256:{file_sha256(p)}" for p in paths})
    x = np.concatenate(images)
    n, height, width = x.shape
    pixels = x.reshape(n, height * width)
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float32)
    return {
        "table": make_table(pixels, np.concatenate(labels).astype(np.int64)),
        "classes": list(range(len(info["class_names"]))),
        "class_names": info["class_names"],
        "image_shape": [1, height, width],
        "pixel_range": [0.0, 255.0],
        "files": files,
    }
