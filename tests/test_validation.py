"""Cleaning, the split and the Great Expectations gate, on real bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config import SplitParams, ValidateParams
from pipeline.data.table import SPLITS
from pipeline.stages.validate import validate
from pipeline.validation.cleaning import clean
from pipeline.validation.split import assign_splits
from pipeline.validation.suite import column_problems, feature_stats
from tests.conftest import copy_project, run


def test_clean_quarantines_each_kind_of_bad_row(small_table, manifest):
    t = small_table.copy()
    t.loc[1, "px_3"] = np.nan
    t.loc[2, "px_4"] = np.inf
    t.loc[3, "px_5"] = 17.0
    t.loc[4, "px_6"] = -1.0
    t["label"] = t["label"].astype(object)
    t.loc[5, "label"] = 12
    t.loc[6, "label"] = "seven"
    t.loc[7, "label"] = 2.5
    t.loc[8, "label"] = None
    dup = t.iloc[[20]].copy()
    conflict = t.iloc[[30]].copy()
    conflict["label"] = (int(conflict["label"].iloc[0]) + 1) % 10
    t = pd.concat([t, dup, conflict], ignore_index=True)
    kept, quarantine = clean(t, manifest)
    reasons = dict(zip(quarantine["row"], quarantine["reason"], strict=True))
    assert reasons[1] == "non-finite feature: px_3=nan"
    assert reasons[2] == "non-finite feature: px_4=inf"
    assert reasons[3] == "feature outside [0, 16]: px_5=17"
    assert reasons[4] == "feature outside [0, 16]: px_6=-1"
    assert reasons[5].startswith("label outside the class set") and reasons[5].endswith("12")
    assert reasons[6] == "label is not a number: 'seven'"
    assert reasons[7] == "label is not an integer: 2.5"
    assert reasons[8] == "label is missing: None"
    assert reasons[200] == "exact duplicate of row 20"
    assert "different label" in reasons[30] and "different label" in reasons[201]
    assert len(quarantine) == 11
    assert len(kept) == len(t) - 11
    assert kept["label"].dtype == np.int64
    assert not kept["sample_id"].duplicated().any()


def test_split_is_deterministic_stable_and_near_the_fractions(digits_table):
    fractions = SplitParams(train=0.7, val=0.15, test=0.15)
    ids = digits_table["sample_id"]
    splits = assign_splits(ids, fractions)
    assert (assign_splits(ids, fractions) == splits).all()
    # A sample keeps its split when other samples come and go.
    subset = assign_splits(ids.iloc[::3].reset_index(drop=True), fractions)
    assert (subset == splits[::3]).all()
    shares = pd.Series(splits).value_counts(normalize=True)
    for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(shares[name] - share) < 0.03
    per_class = pd.crosstab(digits_table["label"], splits)
    assert (per_class[list(SPLITS)] > 0).all().all()


def test_clean_digits_pass_the_suite(digits_table, manifest, tmp_path):
    kept, quarantine, summary = validate(digits_table, manifest, ValidateParams(), tmp_path)
    assert summary["success"], summary["failures"]
    assert len(quarantine) == 0 and len(kept) == 1797
    # Data Docs: a page per suite and per validation, all four listed on the index.
    suites = ["class_counts", "columns", "features", "samples"]
    pages = sorted(p.name for p in (tmp_path / "validations").rglob("*.html"))
    assert pages == [f"runway-{suite}.html" for suite in suites]
    assert sorted(p.name for p in (tmp_path / "expectations").glob("*.html")) == [
        f"{suite}.html" for suite in suites
    ]
    index = (tmp_path / "index.html").read_text()
    for suite in suites:
        assert f"expectations/{suite}.html" in index
        assert f"/runway-{suite}.html" in index
    assert {e["suite"] for e in summary["expectations"]} == set(suites)
    assert all(e["success"] for e in summary["expectations"])


def test_suite_reports_dtype_drift_and_missing_columns(digits_table, manifest, tmp_path):
    t = digits_table.drop(columns=["px_63"])
    t["px_7"] = t["px_7"].astype("float64")
    _, _, summary = validate(t, manifest, ValidateParams(), tmp_path)
    assert not summary["success"]
    text = "\n".join(summary["failures"])
    assert "columns: the table's 66 columns are not the 67 expected: missing ['px_63']" in text
    (dtype_line,) = [f for f in summary["failures"] if "column 'dtype'" in f]
    assert "['float64']" in dtype_line and "feature ['px_7']" in dtype_line


def test_suite_reports_classes_below_the_minimum(digits_table, manifest, tmp_path):
    t = pd.concat(
        [digits_table[digits_table.label != 3], digits_table[digits_table.label == 3][:5]]
    )
    _, _, summary = validate(t, manifest, ValidateParams(min_per_class=20), tmp_path)
    assert not summary["success"]
    assert summary["failures"] == [
        "class '3' has 5 samples, fewer than validate.min_per_class=20",
        "class '3' has no sample in the val and test splits",
    ]


def test_too_many_quarantined_rows_fail(digits_table, manifest, tmp_path):
    t = digits_table.copy()
    t.loc[:199, "px_10"] = np.nan  # 200 of 1797 rows = 11 %
    _, quarantine, summary = validate(
        t, manifest, ValidateParams(max_quarantine_frac=0.05), tmp_path
    )
    assert len(quarantine) == 200
    assert not summary["success"]
    assert "200 × non-finite feature" in summary["failures"][0]


@pytest.mark.slow
def test_validate_stage_refuses_bad_data_and_writes_no_prepared_data(tmp_path):
    project = copy_project(tmp_path)
    run(["python", "-m", "pipeline.stages.ingest"], project)
    raw = project / "data/raw/samples.parquet"
    table = pd.read_parquet(raw)
    table["px_12"] = table["px_12"].astype("float64")  # schema drift
    table.to_parquet(raw, index=False)
    result = run(["python", "-m", "pipeline.stages.validate"], project, check=False)
    assert result.returncode == 1
    assert "FAILED features: expect_column_values_to_be_in_set on column 'dtype'" in result.stdout
    assert "for feature ['px_12']" in result.stdout
    assert "No prepared data written" in result.stderr
    assert not (project / "data/prepared").exists()
    assert not (project / "reports/validation").exists()  # only a passing gate writes there
    summary = json.loads((project / ".runway/validation-failed/summary.json").read_text())
    assert summary["success"] is False
    assert (project / ".runway/validation-failed/data_docs/index.html").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    (run_,) = client.search_runs([client.get_experiment_by_name("runway-digits").experiment_id])
    assert run_.info.status == "FAILED" and run_.data.tags["stage"] == "validate"


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["samples.parquet", "manifest.json"])
def test_validate_stage_without_ingest_output(tmp_path, missing):
    project = copy_project(tmp_path)
    run(["python", "-m", "pipeline.stages.ingest"], project)
    (project / "data/raw" / missing).unlink()
    result = run(["python", "-m", "pipeline.stages.validate"], project, check=False)
    assert result.returncode == 1
    assert f"data/raw/{missing} not found: run the ingest stage first" in result.stderr


def test_the_columns_suite_names_misplaced_columns_and_gx_records_each_position(
    digits_table, manifest, tmp_path
):
    columns = list(digits_table.columns)
    swapped = digits_table[[*columns[:2], "px_1", "px_0", *columns[4:]]]
    _, _, summary = validate(swapped, manifest, ValidateParams(), tmp_path)
    assert [f for f in summary["failures"] if f.startswith("columns:")] == [
        "columns: the table's 67 columns are not the 67 expected: "
        "out of order: 'px_1' at position 3, where 'px_0' is expected"
    ]
    (result,) = [v for v in summary["validation_results"] if v["suite_name"] == "columns"]
    (check,) = result["results"]
    assert check["expectation_config"]["type"] == "expect_column_pair_values_to_be_equal"
    assert not check["success"] and check["result"]["unexpected_count"] == 2
    assert check["result"]["element_count"] == 67  # one row per position, split included
    assert column_problems(["a", "b"], ["a", "b"]) == []
    assert column_problems(["a", "b", "b"], ["a", "b"]) == [
        "columns: the table's 3 columns are not the 2 expected: repeated ['b']"
    ]
    assert column_problems(["a", "x", "x", "b"], ["a", "b"]) == [
        "columns: the table's 4 columns are not the 2 expected: unexpected ['x']; repeated ['x']"
    ]
    assert column_problems([], ["a", "b"]) == [
        "columns: the table's 0 columns are not the 2 expected: missing ['a', 'b']"
    ]


@pytest.mark.parametrize("text", [True, False], ids=["with-text", "numbers-only"])
def test_feature_stats_count_nulls_of_numpy_and_pandas_columns(manifest, monkeypatch, text):
    """NaN in a float32 column and NA in pandas' own Int64 and object columns are nulls; an
    integer column has none; a text cell is no null but no number either (non-finite). The
    same with no text column (the features then read as numbers with NaN for NA), two rows
    at a time."""
    from pipeline.validation import cleaning

    monkeypatch.setattr(cleaning, "BLOCK_VALUES", 2 * 64)
    table = pd.DataFrame({f"px_{i}": np.zeros(3, dtype=np.float32) for i in range(64)})
    table["px_1"] = np.array([np.nan, 1.0, np.inf], dtype=np.float32)
    table["px_2"] = np.array([1, 2, 3], dtype=np.int64)
    table["px_3"] = pd.array([1, None, 3], dtype="Int64")
    if text:
        table["px_4"] = pd.Series(["1", None, "x"], dtype=object)
    table["px_5"] = np.array([0.0, 17.0, -1.0], dtype=np.float32)
    stats = feature_stats(table, manifest).set_index("feature").iloc[:6]
    assert stats.to_dict(orient="list") == {
        "dtype": ["float32", "float32", "int64", "Int64", "object" if text else "float32"]
        + ["float32"],
        "nulls": [0, 1, 0, 1, int(text), 0],
        "non_finite": [0, 2, 0, 1, 2 * text, 0],
        "out_of_range": [0, 1, 0, 0, 0, 2],  # inf is above the range too
    }


def test_na_in_pandas_integer_features_is_quarantined_with_one_line(manifest):
    """pandas' own Int64 can hold NA (NumPy's integers cannot): its rows are quarantined as a
    NaN is (before, np.iinfo of the dtype raised)."""
    table = pd.DataFrame({f"px_{i}": pd.array([1, 2, 3, 4], dtype="Int64") for i in range(64)})
    table.insert(0, "label", np.array([0, 1, 2, 3]))
    table.insert(0, "sample_id", ["a", "b", "c", "d"])
    table.loc[1, "px_7"] = None
    table.loc[2, "px_9"] = 17
    _, quarantine = clean(table, manifest)
    assert dict(zip(quarantine["row"], quarantine["reason"], strict=True)) == {
        1: "non-finite feature: px_7=nan",
        2: "feature outside [0, 16]: px_9=17",
    }


def memory_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is (a view of) a memory-mapped file."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = getattr(array, "base", None)  # an ndarray's, or None past it
    return False


def test_a_raw_table_memory_mapped_from_disk_is_validated_and_written_as_in_memory(
    digits_table, manifest, tmp_path, monkeypatch
):
    """The raw features memory-mapped, checked 70 rows at a time, and the rows kept copied
    into another mapped file (rows are quarantined): the gate and the prepared files are
    those of the table read into memory, byte for byte."""
    from pipeline.data import mapped
    from pipeline.data.table import file_sha256
    from pipeline.io import write_json
    from pipeline.stages.validate import read_raw, write_prepared
    from pipeline.validation import cleaning

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mapped, "TAKE_VALUES", 64 * 100)  # 100 rows a copy
    monkeypatch.setattr(cleaning, "BLOCK_VALUES", 64 * 70)  # 70 rows a check
    t = digits_table.copy()
    t.loc[1, "px_3"] = np.nan  # written as a null, read as NaN
    t.loc[2, "px_4"] = np.inf
    t.loc[3, "px_5"] = 17.0
    t = pd.concat([t, t.iloc[[20]]], ignore_index=True)  # an exact duplicate
    (tmp_path / "raw").mkdir()
    t.to_parquet(tmp_path / "raw/samples.parquet", index=False, row_group_size=500)
    write_json(tmp_path / "raw/manifest.json", manifest.to_dict())
    results = {}
    for placement in ("memory", "disk"):
        table, found, why = read_raw(tmp_path / "raw", placement)
        assert found == manifest
        features = table.filter(like="px_").to_numpy()
        assert memory_mapped(features) == (placement == "disk")
        take = mapped.take_rows if why else None
        kept, quarantine, summary = validate(table, manifest, ValidateParams(), tmp_path, take)
        assert memory_mapped(kept.filter(like="px_").to_numpy()) == (placement == "disk")
        write_prepared(kept, manifest, tmp_path / placement)
        files = {s: file_sha256(tmp_path / placement / f"{s}.parquet") for s in SPLITS}
        summary.pop("validation_results")  # GX's run times and ids
        results[placement] = (why, quarantine, summary, files)
    assert results["memory"][0] is None
    assert results["disk"][0] == "0.4 MB, placement: disk"  # read_raw's, not train's key
    pd.testing.assert_frame_equal(results["memory"][1], results["disk"][1])
    assert list(results["disk"][1]["reason"]) == [
        "non-finite feature: px_3=nan",
        "non-finite feature: px_4=inf",
        "feature outside [0, 16]: px_5=17",
        "exact duplicate of row 20",
    ]
    assert results["memory"][2:] == results["disk"][2:]


def test_a_raw_table_whose_features_cannot_be_mapped_is_read_into_memory_with_a_line(
    digits_table, manifest, tmp_path, monkeypatch, capsys
):
    """Text among the raw features: validate cannot memory-map them, says so in a line, and
    reads the table as pandas does, for the gate to report what is wrong with it."""
    from pipeline.io import write_json
    from pipeline.stages.validate import read_raw

    monkeypatch.chdir(tmp_path)
    t = digits_table.copy()
    t["px_5"] = t["px_5"].astype(str)
    (tmp_path / "raw").mkdir()
    t.to_parquet(tmp_path / "raw/samples.parquet", index=False)
    write_json(tmp_path / "raw/manifest.json", manifest.to_dict())
    table, found, why = read_raw(tmp_path / "raw", "disk")
    assert (found, why) == (manifest, None)
    pd.testing.assert_frame_equal(table, pd.read_parquet(tmp_path / "raw/samples.parquet"))
    assert capsys.readouterr().out == (
        f"[validate] {tmp_path / 'raw/samples.parquet'}: its features are not one block of "
        "numbers, so they cannot be memory-mapped: read into memory (0.4 MB, "
        "placement: disk)\n"
    )
    assert not (tmp_path / ".runway").exists()  # no scratch file was begun
