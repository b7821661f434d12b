"""The canonical sample table every source is turned into.

One row per sample: ``sample_id`` (a content hash of the features, so the same sample keeps
the same id whatever file it came from), ``label`` (int64, an index into the class list) and the
features as columns ``px_0 … px_{n-1}``: pixels in row-major C×H×W order (uint8 for 8-bit
images, float32 otherwise) or, for tabular data, the numeric columns in file order (float32).
The manifest beside it records what a later stage must know: source, row count, checksum,
class set and names, the shape of one sample, the value range (None for tabular data, which is
standardised instead), the storage dtype, the original feature names and the source files read.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

ID_COLUMN = "sample_id"
LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
SPLITS = ("train", "val", "test")

# Where ingest writes the raw table and validate the prepared splits.
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")


FEATURE_PREFIX = "px_"  # a feature column's name is the prefix and its position


def is_feature(name: str) -> bool:
    return name.startswith(FEATURE_PREFIX)


def feature_columns(n_features: int) -> list[str]:
    return [f"{FEATURE_PREFIX}{i}" for i in range(n_features)]


def feature_dtype(schema) -> str:
    """The features' one NumPy dtype in an Arrow schema (``uint8``, ``float32``), ``float32``
    if they differ."""
    names = set()
    for arrow_type in {column.type for column in schema if is_feature(column.name)}:
        try:
            names.add(np.dtype(arrow_type.to_pandas_dtype()).name)
        except NotImplementedError:  # a type with no NumPy equivalent
            names.add("object")
    return names.pop() if len(names) == 1 else "float32"


# Rows converted to float32 at a time by content_ids: at most this many bytes of them.
ID_CHUNK_BYTES = 8 << 20


def content_ids(features: np.ndarray) -> list[str]:
    """A stable id per row: the first 16 hex digits of SHA-256 over its float32 bytes.

    The same pixels give the same id whether stored as uint8 or float32. Rows are converted
    ``ID_CHUNK_BYTES`` at a time, so a 60,000 × 3,072 uint8 array never exists as float32 all
    at once."""
    ids: list[str] = []
    row_bytes = 4 * max(1, int(np.prod(features.shape[1:])))  # as float32
    chunk = max(1, ID_CHUNK_BYTES // row_bytes)
    for start in range(0, len(features), chunk):
        rows = np.ascontiguousarray(features[start : start + chunk], dtype=np.float32)
        ids.extend(hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows)
    return ids


def as_features(features: np.ndarray, labels) -> np.ndarray:
    """``features`` as the canonical table stores them: uint8 stays uint8 (a quarter of the
    memory and disk), anything else is float32; one row per label."""
    features = np.asarray(features)
    if features.dtype != np.uint8:
        features = features.astype(np.float32, copy=False)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (samples × features), got shape {features.shape}")
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    return features


def make_table(features: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Build the canonical table from an (n, n_features) array and n integer labels."""
    features = as_features(features, labels)
    table = pd.DataFrame(features, columns=feature_columns(features.shape[1]), copy=False)
    table.insert(0, LABEL_COLUMN, np.asarray(labels, dtype=np.int64))
    table.insert(0, ID_COLUMN, content_ids(features))
    return table


def arrow_rows(features: np.ndarray, schema, others: dict):
    """Rows as an Arrow table with ``schema``, built a column at a time: its ``px_*`` fields,
    in order, from the columns of the 2-D block ``features`` (NaN as null, as pandas'
    conversion writes it), its other fields from the Arrow arrays in ``others``, by name.

    pandas' own conversion costs about 90 µs and 3 kB a column each time (14 s for 223 rows
    of 224×224 RGB pixels, 150,528 columns; this, 1 s). A column-major block (``array.T`` of
    a C-ordered one) is not copied."""
    import pyarrow as pa

    n_features = sum(map(is_feature, schema.names))
    if features.ndim != 2 or features.shape[1] != n_features:
        raise ValueError(f"features {features.shape} for {n_features} feature columns")
    by_column = np.ascontiguousarray(features.T)  # each feature's values side by side
    feature = iter(by_column)
    return pa.Table.from_arrays(
        [
            pa.array(next(feature), field.type, from_pandas=True)
            if is_feature(field.name)
            else others[field.name]
            for field in schema
        ],
        schema=schema,
    )


def arrow_table(features: np.ndarray, labels: np.ndarray):
    """The canonical table of ``features`` and ``labels`` (as :func:`make_table`) as an Arrow
    table built by :func:`arrow_rows`; pandas reads it back as it reads what
    :func:`make_table`'s frame writes."""
    import pyarrow as pa

    features = as_features(features, labels)
    schema = pa.schema(
        [
            (ID_COLUMN, pa.string()),
            (LABEL_COLUMN, pa.int64()),
            *(
                (name, pa.from_numpy_dtype(features.dtype))
                for name in feature_columns(features.shape[1])
            ),
        ]
    )
    others = {
        ID_COLUMN: pa.array(content_ids(features), pa.string()),
        LABEL_COLUMN: pa.array(np.asarray(labels, dtype=np.int64)),
    }
    return arrow_rows(features, schema, others)


def write_parquet(path: Path | str, tables, schema=None) -> tuple[int, object]:
    """Write Arrow tables to one Parquet file, a row group each, as they come (none is held
    once written); return the rows written and the file's schema. Without ``schema`` the
    first table's is used, and no file is made if no table comes. A generator of tables is
    closed when writing ends, so one stopped early (a failed write, ^C) stops its work now."""
    import pyarrow.parquet as pq

    rows = 0
    writer = None if schema is None else pq.ParquetWriter(path, schema)
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            del table  # not held while the next one is made
    finally:
        if writer is not None:
            writer.close()
        if hasattr(tables, "close"):
            tables.close()
    return rows, None if writer is None else writer.schema


def features_of(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if is_feature(c)]


@dataclass(frozen=True)
class Manifest:
    """What ingest knows about the data it wrote."""

    source: str
    rows: int
    checksum: str
    classes: list[int]
    image_shape: list[int]
    pixel_range: list[float] | None
    class_names: list[str] = field(default_factory=list)
    dtype: str = "float32"
    feature_names: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Each class's name, in class-index order (the index as text if none was recorded)."""
        return list(self.class_names) or [str(c) for c in self.classes]

    @property
    def n_features(self) -> int:
        return int(np.prod(self.image_shape))

    def feature_name(self, column: str) -> str:
        """``px_3`` → ``px_3 (petal_width)`` when the source named its columns."""
        if self.feature_names and is_feature(column):
            index = int(column[len(FEATURE_PREFIX) :])
            if index < len(self.feature_names) and self.feature_names[index] != column:
                return f"{column} ({self.feature_names[index]})"
        return column

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(**data)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Feature columns read per call: a few MB of a wide table in flight at a time.
READ_COLUMNS = 64


def open_parquet(path: Path | str, parquet=None):
    """``parquet`` (a ``pyarrow.parquet.ParquetFile`` of ``path``, open already), or ``path``
    opened as one. Opening reads the footer, which for a wide table takes about 0.1 s per
    10,000 columns: a file read in several ways is opened once."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path) if parquet is None else parquet


def read_columns(parquet, columns: list[str], rows: int) -> pd.DataFrame:
    """The ``columns`` of an open Parquet file as ``pd.read_parquet`` reads them; with none, a
    frame of ``rows`` rows and no column."""
    if not columns:
        return pd.DataFrame(index=range(rows))
    return parquet.read(columns=columns, use_pandas_metadata=True).to_pandas()


def read_features(
    path: Path | str, into=None, parquet=None
) -> tuple[pd.DataFrame | None, np.ndarray | None, list[str]]:
    """A table the pipeline wrote, as ``(front, values, features)``: when the features are the
    last columns, share one numeric type and hold no null, ``values`` is them as one
    C-ordered, writable (rows × features) array, read ``READ_COLUMNS`` at a time, ``front``
    the other columns and ``features`` their names. Otherwise ``front`` is the whole table as
    ``pd.read_parquet`` reads it and ``values`` is None.

    ``into(shape, dtype)``, when given, makes the array the features are written into (a
    memory-mapped file, say; its dtype may differ from the table's, and the values are cast
    as NumPy casts). It is then filled a row group at a time, so that each part of it is
    written in one pass, and nothing else is read: ``front`` is None, and so are ``values``
    where the features cannot be read that way. Null floats are NaN there. ``parquet``:
    ``path`` open already (:func:`open_parquet`)."""

    parquet = open_parquet(path, parquet)

    def whole():  # as pd.read_parquet(path) reads it
        table = parquet.read(use_pandas_metadata=True).to_pandas() if into is None else None
        return table, None, []

    schema = parquet.schema_arrow
    names = schema.names
    features = [n for n in names if is_feature(n)]
    others = names[: len(names) - len(features)]
    types = {schema.field(n).type for n in features}
    if not features or names[len(others) :] != features or len(types) != 1:
        return whole()
    (arrow_type,) = types
    try:
        dtype = np.dtype(arrow_type.to_pandas_dtype())
    except NotImplementedError:
        return whole()
    if dtype.kind not in "uif":
        return whole()
    shape = (parquet.metadata.num_rows, len(features))
    if into is None:
        values = np.empty(shape, dtype=dtype)
        parts = [(slice(None), lambda columns: parquet.read(columns=columns))]
    else:
        values, parts, start = into(shape, dtype), [], 0
        for group in range(parquet.num_row_groups):
            end = start + parquet.metadata.row_group(group).num_rows
            parts.append((slice(start, end), partial(parquet.read_row_group, group)))
            start = end
    for rows, read in parts:
        for start in range(0, len(features), READ_COLUMNS):
            group = read(columns=features[start : start + READ_COLUMNS])
            for offset, column in enumerate(group.columns):
                # pandas reads a null as NaN or NA, in a column of its own dtype: a table in
                # memory is read as pandas reads it, one memory-mapped (too large for that)
                # holds NaN for a null float
                if column.null_count and (into is None or dtype.kind != "f"):
                    return whole()
                values[rows, start + offset] = column.to_numpy(zero_copy_only=False)
    if into is not None:
        return None, values, features
    return read_columns(parquet, others, len(values)), values, features


def read_front(path: Path | str, parquet=None) -> tuple[pd.DataFrame, list[str]]:
    """A table's columns other than its features, as ``pd.read_parquet`` reads them, and its
    features' names. ``parquet``: ``path`` open already (:func:`open_parquet`)."""
    parquet = open_parquet(path, parquet)
    names = parquet.schema_arrow.names
    features = [n for n in names if is_feature(n)]
    others = [n for n in names if not is_feature(n)]
    return read_columns(parquet, others, parquet.metadata.num_rows), features


def with_features(front: pd.DataFrame, values: np.ndarray, features: list[str]) -> pd.DataFrame:
    """``front``'s columns, then ``values`` as the feature columns ``features``: a view of
    ``values``, not a copy."""
    table = pd.DataFrame(values, columns=features, copy=False)
    for position, name in enumerate(front.columns):
        table.insert(position, name, front[name].array)  # its own type (category, Int64, ...)
    return table


def read_table(path: Path | str, parquet=None) -> pd.DataFrame:
    """A table the pipeline wrote with ``to_parquet``, as ``pd.read_parquet`` reads it, in about
    half the memory: when the features are the last columns, share one type and hold no
    null, they are read ``READ_COLUMNS`` at a time into one 2-D array that becomes the frame's
    single block (``pd.read_parquet`` holds Arrow's copy and pandas' per-column copies before
    it consolidates them: 180 MB at the peak for 55 MB of MNIST pixels). Otherwise it is
    ``pd.read_parquet``. See :func:`read_features`."""
    front, values, features = read_features(path, parquet=parquet)
    return front if values is None else with_features(front, values, features)
