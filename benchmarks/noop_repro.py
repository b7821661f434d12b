"""``dvc repro`` when nothing changed, in the scratch pipeline (see stages): how long it takes
DVC to find out there is nothing to do. Goal ≤ 1.5 s (median)."""

from __future__ import annotations

import statistics

from benchmarks.common import Context, result, timed
from benchmarks.stages import pipeline_project

GOAL_S = 1.5


def run(ctx: Context) -> list[dict]:
    project = pipeline_project(ctx)
    walls = []
    for _ in range(ctx.reps):
        wall, out = timed(["dvc", "repro"], project)
        if "Running stage" in out:
            raise RuntimeError(f"no-op dvc repro ran a stage:\n{out}")
        walls.append(wall)
    n = statistics.median(walls)
    return [
        result("no-op `dvc repro`", round(n, 2), None, None, f"<= {GOAL_S} s", n <= GOAL_S, "s")
    ]
