"""A CSV table for tabular classification: one label column, numeric feature columns.

``data.path`` is the file, ``data.label_column`` names the label (default ``label``); every
other column is a feature, in file order, stored as float32. With ``data.features`` (the
expected feature columns) a column missing from the file or not in the list stops ingest:
schema drift is caught before it reaches a model. Labels may be numbers or names;
classes are the sorted distinct labels, or ``data.classes`` when given (then a label not in it
is an error). A feature cell that is not a number is an error naming its line and column;
empty cells become NaN and are quarantined by validate with the reason.

``data.delimiter`` is the one character between columns, or ``auto`` (the default): the
delimiter is the one of ``,`` ``;`` tab ``|`` that splits the header into two or more columns,
and, when several do, the one that splits every sampled line into as many columns as the
header. When that still leaves more than one, ingest stops and asks for ``data.delimiter``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataParams
from pipeline.data.table import file_sha256, make_table
from pipeline.io import StageError

SHOW = 5
DELIMITERS = (",", ";", "\t", "|")
SAMPLE_BYTES = 64 * 1024
SAMPLE_LINES = 50


def detect_delimiter(path: Path) -> str:
    """Which of DELIMITERS separates the columns, judged from the file's first lines."""
    with path.open("rb") as file:
        raw = file.read(SAMPLE_BYTES)
        if len(raw) == SAMPLE_BYTES and b"\n" in raw:
            raw = raw[: raw.rindex(b"\n")]  # whole lines only
    text = raw.decode("utf-8-sig", errors="replace")
    fields: dict[str, list[int]] = {}
    for delimiter in DELIMITERS:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True)
        counts = []
        try:
            for row in reader:
                if row:
                    counts.append(len(row))
                if len(counts) == SAMPLE_LINES:
                    break
        except csv.Error:
            pass
        if counts and counts[0] >= 2:
            fields[delimiter] = counts
    if len(fields) > 1:
        even = {d: c for d, c in fields.items() if all(n == c[0] for n in c)}
        fields = even or fields
    if len(fields) == 1:
        return next(iter(fields))
    if not fields:
        return ","  # one column whatever the delimiter: the checks below say what is missing
    lines = len(next(iter(fields.values())))
    raise StageError(
        f"{path}: cannot tell the column delimiter: "
        + " and ".join(f"{d!r} ({c[0]} columns)" for d, c in fields.items())
        + f" each split the first {lines} line(s) evenly; set data.delimiter to the right one"
    )


def _lines(index: pd.Index) -> str:
    """Table positions → file line numbers (the header is line 1)."""
    lines = [str(i + 2) for i in index[:SHOW]]
    return ", ".join(lines) + (f" and {len(index) - SHOW} more" if len(index) > SHOW else "")


def read_table(path: Path, delimiter: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=delimiter, skipinitialspace=True, engine="c")
    except pd.errors.EmptyDataError:
        raise StageError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a readable CSV file: {str(exc).strip()}") from None
    if table.empty:
        raise StageError(f"{path}: has a header but no rows")
    return table


def numeric_features(table: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    """The feature columns as float32; a non-number cell is an error naming line and column."""
    out = np.empty((len(table), len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        values = table[column]
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() & values.notna()
        if bad.any():
            rows = values.index[bad.to_numpy()]
            raise StageError(
                f"{path}: column {column!r} must be numeric; line {_lines(rows)}: "
                f"{values[bad].iloc[0]!r} is not a number"
            )
        out[:, j] = numbers.to_numpy(dtype=np.float32)
    return out


def encode_labels(labels: pd.Series, params: DataParams, path: Path):
    """Labels → class indices, class ids and names."""
    column = params.label_column
    missing = labels.isna().to_numpy()
    if missing.any():
        raise StageError(
            f"{path}: column {column!r} is empty on line {_lines(labels.index[missing])}"
        )
    if params.classes is not None:
        names = [str(c) for c in params.classes]
    else:
        distinct = labels.unique()
        numeric = pd.to_numeric(pd.Series(distinct), errors="coerce")
        if numeric.notna().all():
            order = np.argsort(numeric.to_numpy(), kind="stable")
            names = [str(distinct[i]) for i in order]
        else:
            names = sorted(map(str, distinct))
    text = labels.astype(str)
    lookup = {name: i for i, name in enumerate(names)}
    codes = text.map(lookup)
    unknown = codes.isna().to_numpy()
    if unknown.any():
        raise StageError(
            f"{path}: column {column!r} on line {_lines(labels.index[unknown])}: "
            f"{text[unknown].iloc[0]!r} is not one of data.classes {names}"
        )
    return codes.to_numpy(dtype=np.int64), list(range(len(names))), names


def load(params: DataParams) -> dict:
    path = params.location()
    if not path.is_file():
        raise StageError(f"{path}: CSV file not found (data.path)")
    if params.delimiter == "auto":
        delimiter, how = detect_delimiter(path), "detected"
    else:
        delimiter, how = params.delimiter, "data.delimiter"
    print(f"[ingest] csv delimiter {delimiter!r} ({how})")
    table = read_table(path, delimiter)
    column = params.label_column
    if column not in table:
        hint = (
            f"; one column only: is {delimiter!r} the delimiter? (data.delimiter)"
            if len(table.columns) == 1
            else ""
        )
        raise StageError(
            f"{path}: no label column {column!r} (data.label_column); columns are "
            f"{list(table.columns)}{hint}"
        )
    features = [c for c in table.columns if c != column]
    if params.features is not None:
        missing = [c for c in params.features if c not in features]
        extra = [c for c in features if c not in params.features]
        if missing or extra:
            raise StageError(
                f"{path}: columns differ from data.features: "
                + "; ".join(
                    f"{what} {cols}"
                    for what, cols in (("missing", missing), ("extra", extra))
                    if cols
                )
            )
        features = list(params.features)
    if not features:
        raise StageError(f"{path}: no feature columns besides {column!r}")
    labels, classes, names = encode_labels(table[column], params, path)
    values = numeric_features(table, features, path)
    return {
        "table": make_table(values, labels),
        "classes": classes,
        "class_names": names,
        "image_shape": [len(features)],
        "pixel_range": None,
        "feature_names": [str(c) for c in features],
        "files": {str(path): f"sha256:{file_sha256(path)}"},
    }
