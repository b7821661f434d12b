"""What a data set looks like, in numbers small enough to keep with a model, and how far
new data has moved from it.

A profile holds the row count, the rows per class (by class name, which survives a class
list that grows) and each feature's mean and standard deviation. Train logs the profile of
the split it fits on with its MLflow run (``data/profile.json``), so the registered champion
always carries the data it was trained on; ``runway retrain`` compares the new data with it.

Drift is flagged when a class's share of the rows moves by more than
``retrain.drift_class_share`` (0.05 = five percentage points), a feature's mean moves by more
than ``retrain.drift_mean`` pooled standard deviations (the standardised mean difference), or a
feature's standard deviation changes by more than ``retrain.drift_std`` (0.25 = by a quarter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.data.table import LABEL_COLUMN, Manifest, features_of

PROFILE_ARTIFACT = "data/profile.json"  # where train logs it in its MLflow run
# Feature values converted to float64 at a time (32 MB), a block of whole rows: features
# memory-mapped from disk are read in file order, each page once per pass.
BLOCK_VALUES = 2**22


def profile(table: pd.DataFrame, manifest: Manifest) -> dict:
    """Rows, rows per class name and each feature's [mean, std] (NaNs left out)."""
    names = manifest.names
    labels = table[LABEL_COLUMN].value_counts().sort_index()

    def name(label: int) -> str:
        return names[label] if 0 <= label < len(names) else f"label {label} (not a class)"

    classes = {name(int(label)): int(n) for label, n in labels.items()}
    columns = features_of(table)
    step = max(1, BLOCK_VALUES // max(1, len(columns)))

    features = table[columns]  # selected once: 12,288 names cost about 10 ms a selection

    def blocks():
        for start in range(0, len(table), step):
            yield features.iloc[start : start + step].to_numpy(dtype=np.float64)

    # Two passes over the rows (NaNs left out): the mean, then the squared deviations from it.
    count, total = np.zeros(len(columns)), np.zeros(len(columns))
    for block in blocks():
        count += np.sum(~np.isnan(block), axis=0)
        total += np.nansum(block, axis=0)
    with np.errstate(all="ignore"):  # an all-NaN column gives NaN, shown as such
        means = total / count
        squares = np.zeros(len(columns))
        for block in blocks():
            squares += np.nansum((block - means) ** 2, axis=0)
        stds = np.sqrt(squares / count)
    features = {
        column: [float(mean), float(std)]
        for column, mean, std in zip(columns, means, stds, strict=True)
    }
    return {"rows": len(table), "classes": classes, "features": features}


@dataclass(frozen=True)
class Thresholds:
    class_share: float
    mean: float
    std: float


def mean_shift(old: list[float], new: list[float]) -> float:
    """|Δ mean| in pooled standard deviations; a constant feature that moves is infinitely far."""
    (m0, s0), (m1, s1) = old, new
    if m0 == m1:
        return 0.0
    pooled = math.sqrt((s0 * s0 + s1 * s1) / 2)
    return abs(m1 - m0) / pooled if pooled > 0 else math.inf


def std_change(old: list[float], new: list[float]) -> float:
    """|Δ std| / old std; a constant feature that starts to vary has changed infinitely."""
    s0, s1 = old[1], new[1]
    if s0 == s1:
        return 0.0
    return abs(s1 - s0) / s0 if s0 > 0 else math.inf


def compare(champion: dict, new: dict, limits: Thresholds) -> dict:
    """Each class's share before and after, and each shared feature's shifts, flagged."""
    n0, n1 = max(champion["rows"], 1), max(new["rows"], 1)
    names = list(champion["classes"]) + [c for c in new["classes"] if c not in champion["classes"]]
    classes = []
    for name in names:
        before = champion["classes"].get(name, 0) / n0
        after = new["classes"].get(name, 0) / n1
        classes.append(
            {
                "class": name,
                "champion": before,
                "new": after,
                "drift": abs(after - before) > limits.class_share,
            }
        )
    features = []
    for column, old in champion["features"].items():
        if column not in new["features"]:
            continue
        now = new["features"][column]
        shift, change = mean_shift(old, now), std_change(old, now)
        features.append(
            {
                "feature": column,
                "champion": old,
                "new": now,
                "mean_shift": shift,
                "std_change": change,
                "drift": shift > limits.mean or change > limits.std,
            }
        )
    features.sort(key=lambda f: (not f["drift"], -max(f["mean_shift"], f["std_change"])))
    unmatched = sorted(set(champion["features"]) ^ set(new["features"]))
    return {"classes": classes, "features": features, "unmatched_features": unmatched}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.3g}"


def markdown(result: dict, limits: Thresholds, feature_name=str, shown: int = 10) -> list[str]:
    """The drift section's lines: every class (all flagged ones when there are many) and the
    features that moved most, flagged ones first."""
    classes, features = result["classes"], result["features"]
    moved = [c for c in classes if c["drift"]]
    lines = [
        f"- class balance: {len(moved)} of {len(classes)} classes moved by more than "
        f"{100 * limits.class_share:g} points (`retrain.drift_class_share`)"
    ]
    listed = classes if len(classes) <= 20 else moved
    if listed:
        lines += ["", "| class | champion's data | new data | |", "|---|---|---|---|"]
        lines += [
            f"| {c['class']} | {_pct(c['champion'])} | {_pct(c['new'])} | "
            f"{'**drift**' if c['drift'] else ''} |"
            for c in listed
        ]
        lines.append("")
    flagged = [f for f in features if f["drift"]]
    lines.append(
        f"- features: {len(flagged)} of {len(features)} moved: mean by more than "
        f"{limits.mean:g} sd (`retrain.drift_mean`) or sd by more than "
        f"{100 * limits.std:g}% (`retrain.drift_std`)"
    )
    if result["unmatched_features"]:
        lines.append(
            f"- features in only one of the two: {', '.join(result['unmatched_features'][:shown])}"
        )
    top = features[: max(shown, 0)]
    if top and top[0]["mean_shift"] + top[0]["std_change"] > 0:
        lines += [
            "",
            "| feature | champion's mean ± sd | new mean ± sd | mean shift (sd) | sd change | |",
            "|---|---|---|---|---|---|",
        ]
        for f in top:
            (m0, s0), (m1, s1) = f["champion"], f["new"]
            lines.append(
                f"| {feature_name(f['feature'])} | {m0:.3g} ± {s0:.3g} | {m1:.3g} ± {s1:.3g} | "
                f"{_num(f['mean_shift'])} | {_num(100 * f['std_change'])}% | "
                f"{'**drift**' if f['drift'] else ''} |"
            )
        lines.append("")
    return lines
