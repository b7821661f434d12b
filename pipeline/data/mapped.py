"""Features too large for memory, memory-mapped from a copy on disk, and when to do so.

:func:`storage` decides from the size of the data and the host's available memory;
:func:`mapped_features` keeps a prepared split's inputs in a ``.npy`` file for tune and
train (and evaluate, register) to share. Imports no torch: validate uses it too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pipeline.data.table import (
    feature_dtype,
    features_of,
    is_feature,
    open_parquet,
    read_columns,
    read_features,
    read_front,
    with_features,
)
from pipeline.io import StageError, atomic_path, clear_dead_writes

# The splits are read into memory when their inputs take at most this share of the host's
# available memory, and memory-mapped from a copy on disk otherwise (see load_prepared).
HOST_SHARE = 0.5
# Where those copies live: one .npy file of a split's inputs, named by the split and its
# Parquet file's identity, made on first use and replacing that split's earlier copy.
MAPPED_DIR = Path(".runway/prepared")


def input_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
    """The inputs' dtype for features of these dtypes: uint8 when all are, float32 otherwise."""
    return np.dtype(np.uint8) if set(dtypes) == {np.dtype(np.uint8)} else np.dtype(np.float32)


def megabytes(nbytes: int) -> str:
    mb = nbytes / 2**20
    return f"{mb:.1f} MB" if mb < 10 else f"{mb:.0f} MB"


class Layout(NamedTuple):
    """A table's inputs as its Parquet footer gives them: their shape (rows × features) and
    dtype (:func:`input_dtype`), the features' own dtype in the table, the names of the
    features and of the table's other columns, the file, open (a
    ``pyarrow.parquet.ParquetFile``), for reading it without reading its footer again (tens
    of MB for a wide table: about 0.1 s per 10,000 columns), and that file's
    :func:`file_identity` (the path may have been given another file since)."""

    shape: tuple[int, int]
    dtype: np.dtype
    table_dtype: np.dtype
    features: list[str]
    others: list[str]
    parquet: object
    identity: str

    @property
    def nbytes(self) -> int:
        """What the inputs take in memory."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def table_nbytes(self) -> int:
        """What the features take in memory in the table's own dtype."""
        return self.shape[0] * self.shape[1] * self.table_dtype.itemsize


def input_layout(path: Path) -> Layout:
    """The :class:`Layout` of the Parquet table at ``path``, the file left open in it."""
    while True:  # the identity of the file opened, though the path may be given another
        identity = file_identity(path)
        parquet = open_parquet(path)
        if file_identity(path) == identity:
            break
        parquet.close()
    schema = parquet.schema_arrow
    features = [name for name in schema.names if is_feature(name)]
    others = [name for name in schema.names if not is_feature(name)]
    shape = (parquet.metadata.num_rows, len(features))
    table_dtype = np.dtype(feature_dtype(schema))
    dtype = input_dtype([table_dtype])
    return Layout(shape, dtype, table_dtype, features, others, parquet, identity)


def storage(
    asked: str,
    nbytes: int,
    available: int | None = None,
    processes: int = 1,
    key: str = "train.data_placement",
) -> tuple[str, str]:
    """Whether the splits' inputs (``nbytes``) are read into ``memory`` or memory-mapped from
    ``disk`` (``asked``, the setting ``key``), and why, in words. Under ``auto`` it is disk
    when ``processes`` copies of them (each of the processes that load them at once holds
    one) take more than ``HOST_SHARE`` of ``available`` (the host's available memory)."""
    size = megabytes(nbytes)
    if asked != "auto":
        return "disk" if asked == "disk" else "memory", f"{size}, {key}: {asked}"
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    copies = f" × {processes} processes" if processes > 1 else ""
    why = f"{size}{copies}, {available / 2**30:.1f} GB available in host memory"
    if nbytes * processes <= HOST_SHARE * available:
        return "memory", why
    return "disk", f"{why}: more than {HOST_SHARE:.0%} of it"


def file_identity(path: Path) -> str:
    """16 hex digits that change when the file is replaced or rewritten: a hash of its size,
    modification time and inode (reading a file of tens of GB to hash its content would
    take minutes in every process that loads it)."""
    import hashlib

    info = path.stat()
    key = f"{info.st_size}-{info.st_mtime_ns}-{info.st_ino}-{info.st_dev}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def mapped_file(target: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """The array in the ``.npy`` file ``target``, memory-mapped, if it has ``shape`` and
    ``dtype``."""
    if not target.exists():
        return None
    try:
        # Copy-on-write: a writable array (as torch.from_numpy wants) that no write can carry
        # back to the file.
        values = np.load(target, mmap_mode="c")
    except (OSError, ValueError):  # cut short or not an .npy file: made again
        return None
    return values if (values.shape, values.dtype) == (tuple(shape), dtype) else None


def split_lock(stem: Path):
    """The lock of a split's files under ``stem`` (``{folder}/{split}``): held while one of
    them (its :func:`mapped_features` copy, or a :func:`shared_take` of it) is made or
    replaced."""
    from filelock import FileLock

    return FileLock(stem.with_name(f"{stem.name}.lock"))


def mapped_features(
    path: Path, stem: Path, layout: Layout | None = None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A prepared split as :func:`~pipeline.data.table.read_features` reads it, with its
    features as its inputs (:func:`input_dtype`) memory-mapped from ``{stem}-{id}.npy``,
    ``id`` being the Parquet file's :func:`file_identity`. The file is made on first use,
    from the Parquet file a row group at a time, and replaces the one of an earlier version
    of the split; one process makes it while the others wait for it. ``layout`` is the
    split's :func:`input_layout`, if it was read already: the split is then the file it
    opened, even if ``path`` names another since. Each load of the split as it is now
    removes the copies of its other versions and their :func:`shared_take` cuts; a late
    load's copy, of a split replaced since it was opened, stays until then (the other late
    loads map it too)."""
    layout = layout or input_layout(path)
    target = stem.with_name(f"{stem.name}-{layout.identity}.npy")
    target.parent.mkdir(parents=True, exist_ok=True)
    with split_lock(stem):
        front = read_columns(layout.parquet, layout.others, layout.shape[0])
        values = mapped_file(target, layout.shape, layout.dtype)
        if values is None:
            with atomic_path(target) as tmp:

                def into(shape, dtype):
                    return new_copy(tmp, target.parent, shape, input_dtype([dtype]))

                _, written, _ = read_features(path, into, layout.parquet)
                if written is None:
                    raise StageError(
                        f"{path}: its features are not one block of numbers, so they cannot "
                        "be memory-mapped; set train.data_placement: host"
                    )
                written.flush()
                del written
            values = np.load(target, mmap_mode="c")
        if layout.identity == identity_now(path):  # not a late load of a replaced split
            # Other versions' copies and their cuts; not target's cuts (shared_take), which
            # are of the same version.
            replace_earlier(target, f"{stem.name}-*.npy", keep=f"{target.stem}-rows-")
    return front, values, layout.features


def identity_now(path: Path) -> str | None:
    """The :func:`file_identity` of ``path`` now, or None when it is gone."""
    try:
        return file_identity(path)
    except FileNotFoundError:
        return None


def new_copy(tmp: Path, folder: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """An ``.npy`` file at ``tmp`` (for a copy in ``folder``) of ``shape`` and ``dtype``,
    mapped for writing, its room on disk taken now; one line when it cannot be made."""
    try:
        values = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        with open(tmp, "r+b") as file:
            reserve(file.fileno(), tmp.stat().st_size)
    except OSError as exc:
        raise cannot_map(folder, int(np.prod(shape)) * dtype.itemsize, exc) from None
    return values


def replace_earlier(target: Path, pattern: str, keep: str | None = None) -> None:
    """Remove the files beside ``target`` that match ``pattern``, but ``target`` and those
    whose names start with ``keep``, and what writers of such files that were killed left
    (a full-size temporary file)."""
    for earlier in target.parent.glob(pattern):
        if earlier != target and not (keep and earlier.name.startswith(keep)):
            earlier.unlink(missing_ok=True)
    clear_dead_writes(target.parent, pattern)


def scratch_array(shape: tuple[int, ...], dtype, folder: Path = MAPPED_DIR) -> np.ndarray:
    """A writable array of ``shape`` in a file of its own under ``folder``, which is gone once
    nothing maps it (where the system allows it, it has no name from the start)."""
    import tempfile

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not nbytes:
        return np.empty(shape, dtype=dtype)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as file:
            reserve(file.fileno(), nbytes)
            return np.memmap(file, dtype=dtype, mode="w+", shape=shape)
    except OSError as exc:
        raise cannot_map(folder, nbytes, exc) from None


def cannot_map(folder: Path, nbytes: int, exc: OSError) -> StageError:
    """The one line for a file of memory-mapped features that cannot be made in ``folder``
    (no room, say)."""
    return StageError(
        f"{folder}: cannot make a file of {megabytes(nbytes)} for memory-mapped features: "
        f"{exc.strerror or exc}"
    )


def reserve(fd: int, nbytes: int) -> None:
    """Allocate ``nbytes`` of the open file ``fd`` on disk now, where the system can: a full
    disk then fails here, with a message, not as a crash (SIGBUS) when a page of a mapping
    of it is first written."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):  # a system without it
                raise


def read_mapped(path: Path, parquet=None) -> tuple[pd.DataFrame, np.ndarray, list[str]] | None:
    """A table as :func:`~pipeline.data.table.read_features` reads it, its features in a
    :func:`scratch_array` (in their own dtype), or None where they cannot be read so.
    ``parquet``: ``path`` open already."""
    parquet = open_parquet(path, parquet)
    _, values, features = read_features(path, scratch_array, parquet)
    if values is None:
        return None
    front, _ = read_front(path, parquet)
    return front, values, features


# Values copied at a time by take.
TAKE_VALUES = 2**22


def take(values: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``values[rows]`` in ``out`` (by default a :func:`scratch_array`), copied a block of
    rows at a time: when ``values`` is memory-mapped, neither it nor the result is held in
    memory."""
    if out is None:
        out = scratch_array((len(rows), *values.shape[1:]), values.dtype)
    step = max(1, TAKE_VALUES // max(1, int(np.prod(values.shape[1:]))))
    for start in range(0, len(rows), step):
        out[start : start + step] = values[rows[start : start + step]]
    return out


def shared_take(source: Path, split: str, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The rows ``rows`` of ``values``, the copy ``source`` of the split ``split`` (a
    :func:`mapped_features` file) as the caller mapped it (rows × features), memory-mapped
    from a file beside it named by it and by a hash of ``rows``. The file is made on first
    use, :func:`take` copying into it, under the split's lock, and replaces the split's
    earlier one; every process that asks for the same rows (a study's workers) then maps
    that one file, as they map the split's copy. It is copied from ``values``, not from the
    file: a load of a newer version of the split may have removed that since. The cut stays
    there for the next run, until the split or the rows change (or a run cuts nothing from it:
    :func:`drop_cuts`)."""
    import hashlib

    rows = np.ascontiguousarray(rows, dtype=np.int64)
    key = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
    target = source.with_name(f"{source.stem}-rows-{key}.npy")
    with split_lock(source.with_name(split)):
        shape = (len(rows), *values.shape[1:])
        taken = mapped_file(target, shape, values.dtype)
        if taken is not None:
            return taken
        with atomic_path(target) as tmp:
            out = take(values, rows, new_copy(tmp, target.parent, shape, values.dtype))
            out.flush()
            del out
        replace_earlier(target, f"{source.stem}-rows-*.npy")
        return np.load(target, mmap_mode="c")


def drop_cuts(source: Path, split: str) -> None:
    """Remove the :func:`shared_take` files of ``source``, the copy of the split ``split``,
    for a run that cuts nothing from it: a cut left from an earlier run would otherwise stay
    on disk (up to the split's size) until the split changes."""
    with split_lock(source.with_name(split)):
        replace_earlier(source, f"{source.stem}-rows-*.npy")


def take_rows(table: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """``table``'s rows at positions ``rows``, its features copied by :func:`take`: for a
    table whose features are one memory-mapped block, neither it nor the result is held in
    memory."""
    columns = features_of(table)
    block = table[columns].to_numpy()  # the table's own array when they are one block
    front = table.drop(columns=columns).iloc[rows].reset_index(drop=True)
    return with_features(front, take(block, rows), columns)
