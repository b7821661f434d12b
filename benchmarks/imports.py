"""Import cost of each stage module (dvc.yaml's), measured with ``python -X importtime`` in a
fresh interpreter, against ``import torch, lightning``. Goals: params, ingest and validate
import no torch; evaluate and register, which score a model, import no Lightning; the others
cost at most 1.3× torch and Lightning (what they need anyway)."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys

from benchmarks.common import ROOT, Context, result
from benchmarks.stages import STAGES

TORCH_FREE = ("params", "ingest", "validate")
LIGHTNING_FREE = ("evaluate", "register")
GOAL = 1.3
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def import_cost(code: str) -> tuple[float, set[str]]:
    """Seconds spent importing what ``code`` imports (cumulative, top level), and the set of
    top-level packages imported."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    total, packages, started = 0, set(), False
    for line in out.splitlines():
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        _, cumulative, indent, name = match.groups()
        packages.add(name.split(".")[0])
        if name == "site":
            started = True  # interpreter start-up ends with site; the code's imports follow
            continue
        if started and indent == " ":
            total += int(cumulative)
    return total / 1e6, packages


def run(ctx: Context) -> list[dict]:
    reference, seconds, packages = [], {s: [] for s in STAGES}, {}
    for _ in range(ctx.reps):
        reference.append(import_cost("import torch; import lightning")[0])
        for s in STAGES:
            cost, packages[s] = import_cost(f"import pipeline.stages.{s}")
            seconds[s].append(cost)
    r = statistics.median(reference)
    rows = []
    for s in STAGES:
        o = statistics.median(seconds[s])
        torch_free = "torch" not in packages[s]
        lightning_free = not {"lightning", "pytorch_lightning"} & packages[s]
        if s in TORCH_FREE:
            goal, passed = "no torch import", torch_free
        elif s in LIGHTNING_FREE:
            goal, passed = "no Lightning import", lightning_free
        else:
            goal, passed = f"<= {GOAL}x", o / r <= GOAL
        imports = "" if torch_free else " (torch)" if lightning_free else " (torch, Lightning)"
        rows.append(
            result(
                f"import pipeline.stages.{s}{imports}",
                round(o, 3),
                round(r, 3),
                round(o / r, 2),
                goal,
                passed,
                "s",
            )
        )
    return rows
