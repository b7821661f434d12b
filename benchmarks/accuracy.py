"""Test accuracy of the default pipeline (the scratch run, see stages) against an RBF SVC
with C and gamma chosen on the same validation split and scored on the same test split.
Goal: at least the SVC's."""

from __future__ import annotations

import json

from benchmarks.common import Context, result
from benchmarks.stages import pipeline_project

C_GRID = [0.1, 1, 10, 100]
GAMMA_GRID = ["scale", 0.0003, 0.001, 0.003, 0.01]


def run(ctx: Context) -> list[dict]:
    from pipeline.baseline import svc_baseline

    project = pipeline_project(ctx)
    ours = json.loads((project / "reports/evaluate/metrics.json").read_text())["test/accuracy"]
    svc = svc_baseline(C_GRID, GAMMA_GRID, project / "data/prepared")
    metric = "test accuracy, default pipeline vs RBF SVC (C, gamma tuned on val)"
    return [svc_row(metric, ours, svc)]


def svc_row(metric: str, ours: float, svc: dict) -> dict:
    """Our test accuracy beside the SVC's (``pipeline.baseline.svc_baseline``); goal: at
    least the SVC's."""
    ref = svc["test_accuracy"]
    return result(
        metric,
        round(ours, 4),
        round(ref, 4),
        round(ours / ref, 4),
        ">= SVC",
        ours >= ref,
        "",
        svc={"C": svc["C"], "gamma": svc["gamma"]},
    )
