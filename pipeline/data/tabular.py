"""A CSV table for tabular classification: one label column, numeric feature columns.

``data.path`` is the file, ``data.label_column`` names the label (default ``label``); every
other column is a feature, in file order, stored as float32. With ``data.features`` (the
expected feature columns) a column missing from the file or not in the list stops ingest:
schema drift is caught before it reaches a model. Labels may be numbers or names;
classes are the sorted distinct labels, or ``data.classes`` when given (then a label not in it
is an error). A feature cell that is not a number is an error naming its line and column;
empty cells become NaN and are quarantined by validate with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataParams
from pipeline.data.table import file_sha256, make_table
from pipeline.io import StageError

SHOW = 5


def _lines(index: pd.Index) -> str:
    """Table positions → file line numbers (the header is line 1)."""
    lines = [str(i + 2) for i in index[:SHOW]]
    return ", ".join(lines) + (f" and {len(index) - SHOW} more" if len(index) > SHOW else "")


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageError(f"{path}: CSV file not found (data.path)")
    try:
        table = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise StageError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a readable CSV file: {exc}") from None
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
    table = read_table(path)
    column = params.label_column
    if column not in table:
        raise StageError(
            f"{path}: no label column {column!r} (data.label_column); columns are "
            f"{list(table.columns)}"
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
