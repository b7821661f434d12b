"""Data profiles and drift (pipeline/data/profile.py) and the retrain report's data lines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.data.profile import Thresholds, compare, markdown, mean_shift, profile, std_change
from pipeline.data.table import Manifest, make_table

LIMITS = Thresholds(class_share=0.05, mean=0.25, std=0.25)


def manifest(names=("cat", "dog")) -> Manifest:
    return Manifest(
        source="csv",
        rows=0,
        checksum="",
        classes=list(range(len(names))),
        image_shape=[2],
        pixel_range=None,
        class_names=list(names),
        feature_names=["height", "weight"],
    )


def test_profile_counts_rows_per_class_name_and_each_features_mean_and_std():
    features = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, np.nan], [7.0, 20.0]])
    table = make_table(features, np.array([0, 0, 1, 5]))
    found = profile(table, manifest())
    assert found == {
        "rows": 4,
        "classes": {"cat": 2, "dog": 1, "label 5 (not a class)": 1},
        "features": {
            "px_0": [4.0, pytest.approx(math.sqrt(5.0))],  # population sd of 1, 3, 5, 7
            "px_1": [pytest.approx(40 / 3), pytest.approx(math.sqrt(200 / 9))],  # NaN left out
        },
    }
    json.dumps(found)  # logged with the run as JSON


def test_a_profile_read_in_blocks_of_rows_is_numpys_nanmean_and_nanstd(monkeypatch):
    from pipeline.data import profile as module

    monkeypatch.setattr(module, "BLOCK_VALUES", 40)  # 8 rows of 5 features a block
    rng = np.random.default_rng(6)
    features = rng.normal(3.0, 2.0, (101, 5))
    features[rng.random((101, 5)) < 0.1] = np.nan
    features[:, 4] = np.nan  # no value at all
    features = features.astype(np.float32).astype(np.float64)  # as the table holds them
    found = profile(make_table(features, np.arange(101) % 2), manifest(("a", "b")))
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        means, stds = np.nanmean(features, axis=0), np.nanstd(features, axis=0)
    for i in range(4):
        assert found["features"][f"px_{i}"] == [
            pytest.approx(means[i], rel=1e-12),
            pytest.approx(stds[i], rel=1e-12),
        ]
    assert np.isnan(found["features"]["px_4"]).all()
    assert found["rows"] == 101 and found["classes"] == {"a": 51, "b": 50}


def test_shifts_are_in_pooled_sds_and_a_constant_feature_that_moves_is_infinitely_far():
    assert mean_shift([0.0, 3.0], [5.0, 4.0]) == pytest.approx(5 / math.sqrt(12.5))
    assert mean_shift([2.0, 0.0], [2.0, 0.0]) == 0.0
    assert mean_shift([0.0, 0.0], [1.0, 0.0]) == math.inf
    assert std_change([0.0, 2.0], [0.0, 3.0]) == 0.5
    assert std_change([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert std_change([0.0, 0.0], [0.0, 1.0]) == math.inf


def test_compare_flags_what_moved_past_the_thresholds_and_not_what_reached_them():
    champion = {
        "rows": 100,
        "classes": {"cat": 50, "dog": 50},
        "features": {"px_0": [0.0, 1.0], "px_1": [0.0, 1.0], "px_2": [1.0, 1.0]},
    }
    new = {
        "rows": 100,
        "classes": {"cat": 45, "dog": 40, "bird": 15},
        "features": {"px_0": [0.25, 1.0], "px_1": [0.0, 1.5], "px_3": [0.0, 1.0]},
    }
    result = compare(champion, new, LIMITS)
    assert [(c["class"], c["champion"], c["new"], c["drift"]) for c in result["classes"]] == [
        ("cat", 0.5, 0.45, False),  # exactly 5 points: not more than the threshold
        ("dog", 0.5, 0.4, True),
        ("bird", 0.0, 0.15, True),
    ]
    assert [(f["feature"], f["drift"]) for f in result["features"]] == [
        ("px_1", True),  # sd up by half
        ("px_0", False),  # mean moved 0.25 sd: the threshold, not past it
    ]
    assert result["unmatched_features"] == ["px_2", "px_3"]
    lines = markdown(result, LIMITS, feature_name=lambda c: f"{c}!")
    assert lines[0] == (
        "- class balance: 2 of 3 classes moved by more than 5 points (`retrain.drift_class_share`)"
    )
    assert "| dog | 50.0% | 40.0% | **drift** |" in lines
    assert "| cat | 50.0% | 45.0% |  |" in lines
    assert (
        "- features: 1 of 2 moved: mean by more than 0.25 sd (`retrain.drift_mean`) or sd by "
        "more than 25% (`retrain.drift_std`)"
    ) in lines
    assert "- features in only one of the two: px_2, px_3" in lines
    assert "| px_1! | 0 ± 1 | 0 ± 1.5 | 0 | 50% | **drift** |" in lines


def test_the_report_groups_quarantined_rows_by_reason_and_reads_hashes_from_dvc_lock(
    tmp_path, monkeypatch
):
    from pipeline import retrain

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: x\n    deps:\n"
        "    - path: data/external\n      md5: aaaaaaaaaaaaaaaa.dir\n"
        "    outs:\n    - path: data/raw\n      md5: bbbbbbbbbbbbbbbb.dir\n"
    )
    assert retrain.data_hashes() == {
        "data/external": "aaaaaaaaaaaaaaaa.dir",
        "data/raw": "bbbbbbbbbbbbbbbb.dir",
    }
    summary = tmp_path / "reports/validation/summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(
        json.dumps(
            {
                "success": True,
                "rows_in": 10,
                "rows_quarantined": 3,
                "rows_out": 7,
                "quarantine_reasons": {
                    "exact duplicate of row 1": 1,
                    "exact duplicate of row 4": 1,
                    "non-finite feature: px_2 (weight)=nan": 1,
                },
                "statistics": {
                    "samples": {"evaluated_expectations": 7, "successful_expectations": 7}
                },
                "failures": [],
            }
        )
    )
    outcome = retrain.Outcome([], [], hashes_before={"data/external": "0" * 16 + ".dir"})
    lines = retrain.data_lines(outcome)
    assert lines[:5] == [
        "| data | before | after |",
        "|---|---|---|",
        "| `data/external` | `000000000000` | `aaaaaaaaaaaa` (changed) |",
        "| `data/raw` | `–` | `bbbbbbbbbbbb` (changed) |",
        "| `data/prepared` | `–` | `–` |",
    ]
    assert lines[6:9] == [
        "- rows in: 10, quarantined: 3, kept: 7",
        "- quarantined by reason: 2 × exact duplicate; 1 × non-finite feature",
        "- Great Expectations: passed (samples 7/7 expectations met)",
    ]
