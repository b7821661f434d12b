"""The Great Expectations 1.x suites that gate the prepared data.

Four suites, each run through a Checkpoint that also renders Data Docs:

- ``columns`` on one row per column position: the column found there equals the one expected
  (``sample_id``, ``label``, ``split``, then ``px_0 … px_{n-1}``); the failure names the
  missing, unexpected or misplaced columns.
- ``samples`` on the cleaned, split table's ids, labels and splits: ids that are 16 hex digits
  and unique (so no sample is in two splits), labels int64 and in the class set, split names
  known. The pixels are not part of this batch: GX fingerprints every cell of a batch it is
  given (14 s of a 20,000 × 12,288 image table's validation, for nothing checked there).
- ``features`` on one row per feature column (its dtype and the count of null, non-finite and
  out-of-range values, computed with NumPy over the whole column): the dtype the manifest
  promises, no null or non-finite value, nothing outside the value range. One row per column
  keeps the suite at a handful of expectations whether there are 4 features or 3,072 (CIFAR-10),
  and a failure names the columns.
- ``class_counts`` on one row per class: at least ``min_per_class`` samples in all, and at least
  one in each of train, val and test.

The two suites of one row per thing checked (columns, classes) put their failures in words
(:func:`column_problems`, :func:`class_count_problems`); GX's results hold the same verdicts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.table import (
    ID_COLUMN,
    LABEL_COLUMN,
    SPLIT_COLUMN,
    SPLITS,
    Manifest,
    feature_columns,
)
from pipeline.validation.cleaning import feature_blocks


@dataclass
class SuiteResult:
    success: bool
    failures: list[str]
    statistics: dict[str, dict]
    expectations: list[dict]
    validations: list[dict] = field(default_factory=list)  # GX's result JSON, one per suite
    counts: pd.DataFrame | None = None  # class_counts of the checked table


def class_counts(table: pd.DataFrame, classes: list[int]) -> pd.DataFrame:
    """One row per class: label, samples per split and in total (zeros included)."""
    counts = pd.crosstab(table[LABEL_COLUMN], table[SPLIT_COLUMN])
    counts = counts.reindex(index=classes, columns=list(SPLITS), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts = counts.rename_axis(index=LABEL_COLUMN, columns=None).reset_index()
    return counts.astype("int64")


def class_count_problems(counts: pd.DataFrame, names: list[str], min_per_class: int) -> list[str]:
    """The class_counts failures in words, naming each class by its name."""
    problems = []
    for row in counts.itertuples(index=False):
        name = names[row.label] if 0 <= row.label < len(names) else str(row.label)
        if row.total < min_per_class:
            problems.append(
                f"class {name!r} has {row.total} sample{'s' if row.total != 1 else ''}, "
                f"fewer than validate.min_per_class={min_per_class}"
            )
        empty = [split for split in SPLITS if getattr(row, split) == 0]
        if row.total and empty:
            problems.append(
                f"class {name!r} has no sample in the {' and '.join(empty)} "
                f"split{'s' if len(empty) > 1 else ''}"
            )
    return problems


def feature_stats(table: pd.DataFrame, manifest: Manifest) -> pd.DataFrame:
    """One row per expected feature column present: dtype and counts of bad values."""
    columns = [c for c in feature_columns(manifest.n_features) if c in table]
    dtypes = dict(zip(table.columns, table.dtypes, strict=False))  # one per name
    nulls, nonfinite, outside = (np.zeros(len(columns), dtype=np.int64) for _ in range(3))
    # NumPy's own numbers: null is NaN (counted from the values), and ints have none. pandas'
    # own dtypes, or cells that are not numbers: counted by pandas.
    plain = np.array(
        [isinstance(dtypes[c], np.dtype) and dtypes[c].kind in "iuf" for c in columns], dtype=bool
    )
    if not plain.all():
        others = [c for c, p in zip(columns, plain, strict=True) if not p]
        nulls[~plain] = table[others].isna().sum().to_numpy(dtype=np.int64)
    for _, values in feature_blocks(table, columns):  # a block of rows at a time
        if values.dtype.kind == "f":  # NaN: a null where the column is NumPy's own
            nulls[plain] += np.isnan(values).sum(axis=0)[plain]
            nonfinite += (~np.isfinite(values)).sum(axis=0)
        if manifest.pixel_range is not None and len(values):
            low, high = manifest.pixel_range
            outside += ((values < low) | (values > high)).sum(axis=0)
    return pd.DataFrame(
        {
            "feature": [manifest.feature_name(c) for c in columns],
            "dtype": [str(dtypes[c]) for c in columns],
            "nulls": nulls,
            "non_finite": nonfinite,
            "out_of_range": outside,
        }
    )


def expected_columns(manifest: Manifest) -> list[str]:
    """The cleaned, split table's columns, in order."""
    return [ID_COLUMN, LABEL_COLUMN, SPLIT_COLUMN, *feature_columns(manifest.n_features)]


def column_positions(columns: list[str], expected: list[str]) -> pd.DataFrame:
    """One row per column position of the table or of ``expected``: the column found there and
    the one expected (None past the end of either)."""
    n = max(len(columns), len(expected))
    return pd.DataFrame(
        {
            "position": np.arange(n),
            "column": [*columns, *[None] * (n - len(columns))],
            "expected": [*expected, *[None] * (n - len(expected))],
        }
    )


def _listing(names: list[str], show: int = 10) -> str:
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return f"{names[:show]}{more}"


def column_problems(columns: list[str], expected: list[str]) -> list[str]:
    """The columns suite's failure in words: missing, unexpected, repeated or misplaced
    columns."""
    if columns == expected:
        return []
    found, wanted = set(columns), set(expected)
    parts = []
    if missing := [c for c in expected if c not in found]:
        parts.append(f"missing {_listing(missing)}")
    if extra := list(dict.fromkeys(c for c in columns if c not in wanted)):
        parts.append(f"unexpected {_listing(extra)}")
    if repeated := [c for c, n in Counter(columns).items() if n > 1]:
        parts.append(f"repeated {_listing(repeated)}")
    if not parts:  # the same names, each once: some are out of place
        i = next(i for i, (a, b) in enumerate(zip(columns, expected, strict=True)) if a != b)
        parts.append(
            f"out of order: {columns[i]!r} at position {i}, where {expected[i]!r} is expected"
        )
    return [
        f"columns: the table's {len(columns)} columns are not the {len(expected)} expected: "
        + "; ".join(parts)
    ]


def _columns_expectations() -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnPairValuesToBeEqual(column_A="column", column_B="expected")]


def _samples_expectations(manifest: Manifest) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToNotBeNull(column=ID_COLUMN),
        gxe.ExpectColumnValuesToMatchRegex(column=ID_COLUMN, regex=r"^[0-9a-f]{16}$"),
        gxe.ExpectColumnValuesToBeUnique(column=ID_COLUMN),
        gxe.ExpectColumnValuesToBeOfType(column=LABEL_COLUMN, type_="int64"),
        gxe.ExpectColumnValuesToBeInSet(column=LABEL_COLUMN, value_set=manifest.classes),
        gxe.ExpectColumnValuesToBeInSet(column=SPLIT_COLUMN, value_set=list(SPLITS)),
    ]


def _features_expectations(manifest: Manifest) -> list:
    import great_expectations.expectations as gxe

    exps = [
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=[manifest.dtype]),
        gxe.ExpectColumnValuesToBeBetween(column="nulls", max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="non_finite", max_value=0),
    ]
    if manifest.pixel_range is not None:
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="out_of_range", max_value=0))
    return exps


def _counts_expectations(min_per_class: int, classes: list[int]) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnDistinctValuesToEqualSet(column=LABEL_COLUMN, value_set=classes),
        gxe.ExpectColumnValuesToBeBetween(column="total", min_value=min_per_class),
        *(gxe.ExpectColumnValuesToBeBetween(column=split, min_value=1) for split in SPLITS),
    ]


def counted(suite: str, r) -> bool:
    """A per-class count or the column-position expectation, which class_count_problems and
    column_problems put in words instead."""
    column = r.expectation_config.kwargs.get("column")
    return suite == "columns" or (suite == "class_counts" and column in ("total", *SPLITS))


def _describe_failure(suite: str, r, rows_named: tuple[str, list] | None = None) -> str:
    """One line for a failed expectation: what was expected, where, and examples."""
    config = r.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column")}
    where = f"column {config.kwargs['column']!r}" if "column" in config.kwargs else "table"
    result = r.result or {}
    detail = ""
    if "unexpected_count" in result:
        examples = result.get("partial_unexpected_list") or []
        detail = f": {result['unexpected_count']} unexpected value(s), e.g. {examples[:5]}"
        rows = result.get("partial_unexpected_index_list")
        if rows_named is not None and rows:
            what, names = rows_named
            detail += f" for {what} {[names[i] for i in rows[:10]]}"
    elif "observed_value" in result:
        detail = f": observed {result['observed_value']!r}"
    elif r.exception_info and r.exception_info.get("raised_exception"):
        detail = f": {r.exception_info.get('exception_message')}"
    return f"{suite}: {config.type} on {where} {kwargs}{detail}"


def run_suites(
    table: pd.DataFrame, manifest: Manifest, min_per_class: int, docs_dir: Path
) -> SuiteResult:
    """Validate ``table`` (with a split column); write Data Docs into ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # One summary line per suite reads better in `dvc repro` logs than GX's metric bars.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        site_name="runway",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("runway")
    if LABEL_COLUMN in table and SPLIT_COLUMN in table:
        counts = class_counts(table, manifest.classes)
    else:  # no labels, or no ids to split by: the columns suite names the missing columns
        counts = pd.DataFrame({c: pd.Series(dtype="int64") for c in (LABEL_COLUMN, *SPLITS)})
        counts["total"] = pd.Series(dtype="int64")
    stats = feature_stats(table, manifest)
    columns, expected = [str(c) for c in table.columns], expected_columns(manifest)
    frames = {
        "columns": (column_positions(columns, expected), _columns_expectations(), None),
        "samples": (
            table[[c for c in (ID_COLUMN, LABEL_COLUMN, SPLIT_COLUMN) if c in table]],
            _samples_expectations(manifest),
            None,
        ),
        "features": (stats, _features_expectations(manifest), ("feature", list(stats["feature"]))),
        "class_counts": (
            counts,
            _counts_expectations(min_per_class, manifest.classes),
            ("class", manifest.names),
        ),
    }
    failures: list[str] = []
    statistics: dict[str, dict] = {}
    expectations: list[dict] = []
    validations: list[dict] = []
    for name, (frame, exps, row_names) in frames.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=exps))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{name}_gate",
                validation_definitions=[definition],
                actions=[],  # Data Docs are built once, below
                result_format={"result_format": "SUMMARY"},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        for validation in outcome.run_results.values():
            statistics[name] = dict(validation.statistics)
            validations.append(validation.to_json_dict())
            for r in validation.results:
                expectations.append(
                    {
                        "suite": name,
                        "type": r.expectation_config.type,
                        "column": r.expectation_config.kwargs.get("column"),
                        "success": bool(r.success),
                    }
                )
                if not r.success and not counted(name, r):
                    failures.append(_describe_failure(name, r, row_names))
        if name == "columns":
            failures += column_problems(columns, expected)
        if name == "class_counts":
            failures += class_count_problems(counts, manifest.names, min_per_class)
    # Once for the four suites: an UpdateDataDocsAction on each checkpoint would rebuild the
    # whole site after each one (0.9 s of a 1.4 s validation of the digits).
    context.build_data_docs(site_names=["runway"])
    return SuiteResult(not failures, failures, statistics, expectations, validations, counts)
