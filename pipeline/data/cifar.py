"""CIFAR-10, binary version (``cifar-10-binary.tar.gz``): never the pickled "python version".

Each batch file is a run of 3,073-byte records: one label byte, then 1,024 red, 1,024 green and
1,024 blue pixel bytes (32×32, row-major), which is already the C×H×W order the pipeline uses.
``data.path`` is the archive itself or a folder holding it or its extracted
``cifar-10-batches-bin/`` folder (default ``data/external/cifar10/``); ``data.download: true``
fetches the archive there. The archive is read in memory after its member names are checked
(see :mod:`pipeline.data.download`); nothing is extracted.

Class names come from ``batches.meta.txt`` (one per line, blank lines ignored) when it is there,
so a set in the same format with another number of classes (at least two) reads as it is;
without it, the ten CIFAR-10 names. A label byte past the listed classes stops ingest, naming
the batch file and the record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import DataParams
from pipeline.data.download import fetch, read_members
from pipeline.data.table import file_sha256, make_table
from pipeline.io import StageError

ARCHIVE = "cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
MIRRORS = ["https://www.cs.toronto.edu/~kriz/"]
FOLDER = "cifar-10-batches-bin"
BATCHES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
META = "batches.meta.txt"
SHAPE = (3, 32, 32)
RECORD = 1 + int(np.prod(SHAPE))
CLASS_NAMES = [
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
]


def parse_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Records → (N × 3072 uint8 pixels, N labels)."""
    if not raw or len(raw) % RECORD:
        raise StageError(
            f"{name}: {len(raw)} bytes is not a whole number of {RECORD}-byte CIFAR-10 records "
            "(truncated or not the binary version)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    return records[:, 1:], records[:, 0].astype(np.int64)


def _read(location: Path) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """Batch files' bytes (and the meta file when present) from an archive or a folder; the
    source files with their checksums; and each member's name for messages."""
    members = [*BATCHES, META]
    if location.is_dir():
        for folder in (location / FOLDER, location):
            if all((folder / b).is_file() for b in BATCHES):
                data = {b: (folder / b).read_bytes() for b in BATCHES}
                if (folder / META).is_file():
                    data[META] = (folder / META).read_bytes()
                files = {str(folder / b): f"sha256:{file_sha256(folder / b)}" for b in data}
                return data, files, {b: str(folder / b) for b in members}
        location = location / ARCHIVE
    if not location.is_file():
        raise StageError(
            f"{location}: not found (nor an extracted {FOLDER}/ folder); put {ARCHIVE} "
            "there, set data.path, or set data.download: true"
        )
    data = read_members(location, BATCHES, optional=(META,))
    files = {str(location): f"sha256:{file_sha256(location)}"}
    return data, files, {b: f"{location}: {b}" for b in members}


def class_names(data: dict[str, bytes], meta: str) -> tuple[list[str], str]:
    """The names listed in the meta file, or CIFAR-10's ten when there is none; and where
    they came from, for messages."""
    if META not in data:
        return CLASS_NAMES, f"CIFAR-10 has {len(CLASS_NAMES)} classes (there is no {META})"
    lines = data[META].decode(errors="replace").splitlines()
    names = [name for name in (line.strip() for line in lines) if name]
    if len(names) < 2:
        raise StageError(
            f"{meta}: lists {len(names)} class name(s); expected one name per line, at least two"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StageError(f"{meta}: lists {', '.join(map(repr, repeated))} more than once")
    return names, f"{META} lists {len(names)} classes"


def check_labels(labels: np.ndarray, count: int, listed: str, name: str) -> None:
    """Every label byte is the index of one of the ``count`` classes."""
    outside = np.flatnonzero(labels >= count)
    if len(outside):
        first = int(outside[0])
        raise StageError(
            f"{name}: record {first + 1} (byte offset {first * RECORD}) has label "
            f"{labels[first]}, but {listed} (labels 0 to {count - 1}); "
            f"{len(outside)} record(s) of this file are outside them"
        )


def load(params: DataParams) -> dict:
    location = params.location()
    if params.download and not (location.is_file() or (location / ARCHIVE).is_file()):
        fetch(ARCHIVE, MD5, MIRRORS, location if location.suffix != ".gz" else location.parent)
    data, files, shown = _read(location)
    names, listed = class_names(data, shown[META])
    parts = [parse_batch(data[b], shown[b]) for b in BATCHES]
    for b, (_, labels) in zip(BATCHES, parts, strict=True):
        check_labels(labels, len(names), listed, shown[b])
    return {
        "table": make_table(
            np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        ),
        "classes": list(range(len(names))),
        "class_names": names,
        "image_shape": list(SHAPE),
        "pixel_range": [0.0, 255.0],
        "files": files,
    }
