"""Row-level cleaning: every row that cannot be trained on goes to quarantine with a reason.

Checks, in order, each naming the column and value: a label that is missing, not an integer
or outside the class set; a feature that is NaN or ±inf; a feature outside the source's pixel
range; an exact duplicate of an earlier row (same content hash and label: the first is kept);
the same content under two different labels (all copies quarantined). Columns that are missing
or extra are not a row problem: the Great Expectations suite reports them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pipeline.data.table import ID_COLUMN, LABEL_COLUMN, Manifest, features_of


def _mark(reasons: pd.Series, mask: np.ndarray, describe: Callable[[int], str]) -> None:
    """Give each row in ``mask`` that has no reason yet the reason ``describe(position)``."""
    positions = np.flatnonzero(np.asarray(mask, dtype=bool) & reasons.isna().to_numpy())
    if len(positions):
        reasons.iloc[positions] = [describe(i) for i in positions]


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# Feature values checked at a time (a few MB in flight, not a copy of the whole table), in
# blocks of whole rows: features memory-mapped from disk are read in file order, once.
BLOCK_VALUES = 2**21


def feature_blocks(table: pd.DataFrame, columns: list[str]):
    """``(rows, values)`` for blocks of whole rows: a slice of ``table``'s rows and their
    ``columns`` as :func:`feature_values` makes them (where the features are one block of
    the table, as in the pipeline's tables, a view of it: no copy)."""
    frame = table[columns]
    convert = converter(frame)
    step = max(1, BLOCK_VALUES // max(1, len(columns)))
    for start in range(0, len(table), step):
        rows = slice(start, min(start + step, len(table)))
        yield rows, convert(frame.iloc[rows])


def converter(frame: pd.DataFrame):
    """How :func:`feature_values` turns ``frame``'s columns (and any rows of them) into one
    array, chosen once from their dtypes."""
    dtypes = set(frame.dtypes)
    if all(isinstance(t, np.dtype) and t.kind in "iuf" for t in dtypes):
        return lambda part: part.to_numpy()
    if all(pd.api.types.is_numeric_dtype(t) for t in dtypes):  # pandas' own: NA as NaN
        return lambda part: part.to_numpy(dtype=np.float64, na_value=np.nan)
    return lambda part: part.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)


def feature_values(table: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The feature block as one array in its stored dtype (uint8 or float32, no copy to
    float64); columns of pandas' own numeric dtypes become float64 with NaN for NA, and
    columns that are not numeric (a damaged table) are coerced, so bad cells become NaN."""
    frame = table[columns]
    return converter(frame)(frame)


def find_bad_rows(table: pd.DataFrame, manifest: Manifest) -> pd.Series:
    """A reason string per offending row, indexed like ``table`` (first problem only)."""
    reasons = pd.Series(pd.NA, index=table.index, dtype=object)

    if LABEL_COLUMN in table:
        raw = table[LABEL_COLUMN]
        numeric = pd.to_numeric(raw, errors="coerce")
        missing = raw.isna().to_numpy()
        not_number = numeric.isna().to_numpy() & ~missing
        not_integer = ~missing & ~not_number & (numeric % 1 != 0).fillna(False).to_numpy()
        outside = ~missing & ~not_number & ~not_integer & ~numeric.isin(manifest.classes).to_numpy()
        for mask, what in (
            (missing, "label is missing"),
            (not_number, "label is not a number"),
            (not_integer, "label is not an integer"),
            (outside, f"label outside the class set {manifest.classes}"),
        ):
            _mark(reasons, mask, lambda i, what=what: f"{what}: {_show(raw.iloc[i])}")

    columns = features_of(table)
    checks = []
    if columns:
        dtypes = set(table.dtypes[columns])
        # NumPy's integers cannot be NaN or infinite (pandas' own can be NA: read as NaN)
        integers = all(isinstance(t, np.dtype) and t.kind in "iu" for t in dtypes)
        if not integers:
            checks.append((lambda v: ~np.isfinite(v), "non-finite feature"))
        if manifest.pixel_range is not None:
            low, high = manifest.pixel_range
            infos = [np.iinfo(t) for t in dtypes] if integers else []
            if not infos or low > min(i.min for i in infos) or high < max(i.max for i in infos):
                checks.append(
                    (lambda v: (v < low) | (v > high), f"feature outside [{low:g}, {high:g}]")
                )
    if checks:  # the first offending column of each row, per check, a block of rows at a time
        first = {what: np.full(len(table), -1, dtype=np.int64) for _, what in checks}
        for rows, values in feature_blocks(table, columns):
            for test, what in checks:
                bad = test(values)
                hit = bad.any(axis=1)
                first[what][rows][hit] = bad[hit].argmax(axis=1)
        for _, what in checks:
            where = first[what]
            _mark(
                reasons,
                where >= 0,
                lambda i, what=what, where=where: (
                    f"{what}: {manifest.feature_name(columns[where[i]])}="
                    f"{float(feature_values(table.iloc[[i]], [columns[where[i]]])[0, 0]):g}"
                ),
            )

    if ID_COLUMN in table and LABEL_COLUMN in table:
        labels_per_id = table.groupby(ID_COLUMN, sort=False)[LABEL_COLUMN].transform("nunique")
        conflict = (labels_per_id > 1).to_numpy()
        _mark(reasons, conflict, lambda i: "same content as another row but a different label")
        duplicate = table.duplicated(subset=[ID_COLUMN, LABEL_COLUMN], keep="first").to_numpy()
        first_row = table.reset_index().groupby(ID_COLUMN, sort=False)["index"].transform("first")
        _mark(reasons, duplicate, lambda i: f"exact duplicate of row {first_row.iloc[i]}")
    return reasons.dropna()


def clean(
    table: pd.DataFrame, manifest: Manifest, take: Callable | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``table`` into rows to keep and a quarantine table (row, sample_id, reason).
    ``take(table, positions)``, when given, makes the kept rows' table where rows are
    quarantined (see :func:`pipeline.data.mapped.take_rows`)."""
    reasons = find_bad_rows(table, manifest)
    quarantine = pd.DataFrame(
        {
            "row": reasons.index.to_numpy(),
            ID_COLUMN: table.loc[reasons.index, ID_COLUMN].to_numpy()
            if ID_COLUMN in table
            else pd.NA,
            "reason": reasons.to_numpy(dtype=str),
        }
    )
    # No copy of the data when every row is kept (the usual case: a copy is as large as the
    # data): a shallow copy shares it, and columns set or added later leave ``table`` alone.
    if not len(reasons):
        kept = table.copy(deep=False).reset_index(drop=True)
    elif take is None:
        kept = table.drop(index=reasons.index).reset_index(drop=True)
    else:
        kept = take(table, np.flatnonzero(~table.index.isin(reasons.index)))
    if LABEL_COLUMN in kept and kept[LABEL_COLUMN].dtype != np.int64:
        labels = pd.to_numeric(kept[LABEL_COLUMN], errors="coerce")
        if labels.notna().all():
            kept[LABEL_COLUMN] = labels.astype(np.int64).to_numpy()
    return kept, quarantine
