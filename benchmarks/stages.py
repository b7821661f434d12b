"""What one default pipeline costs, stage by stage: each stage's wall time and peak memory
(the kernel's high-water mark of the stage process's resident memory, VmHWM), run as
``python -m pipeline.stages.<stage>`` in a scratch copy of the project. For information: no
goal. The finished scratch pipeline is what noop_repro and accuracy measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, Context, child_env, project_copy, result, timed


def dvc_stages() -> list[str]:
    """The pipeline's stage modules in dvc.yaml's order (each stage's command is
    ``python -m pipeline.stages.<name>``)."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [stage["cmd"].split()[-1].rsplit(".", 1)[-1] for stage in stages.values()]


STAGES = dvc_stages()

# Runs a stage module and, as the interpreter exits, records VmHWM. wait4's ru_maxrss would
# not do: Linux carries the parent's resident size across fork+exec into the child's
# maximum, and the benchmark process holds torch.
PEAK_RSS = """
import atexit, os, runpy, sys
def record():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["RUNWAY_BENCH_PEAK"], "w") as out:
        out.write(peak)
atexit.register(record)
sys.argv = [sys.argv[1]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_stage(stage: str, project: Path) -> tuple[float, int]:
    """Wall seconds and peak resident memory (kB) of one stage."""
    peak = project / f".peak-{stage}"
    cmd = [sys.executable, "-c", PEAK_RSS, f"pipeline.stages.{stage}"]
    wall, _ = timed(cmd, project, RUNWAY_BENCH_PEAK=str(peak))
    kb = int(peak.read_text())
    peak.unlink()
    return wall, kb


def pipeline_project(ctx: Context) -> Path:
    """A scratch copy of the project with the default pipeline run once, stage by stage, and
    its outputs committed to DVC (so ``dvc repro`` has nothing to do)."""

    def build() -> Path:
        project = project_copy(ctx.scratch / "project")
        stages = ctx.report.setdefault("stages", {})
        for s in STAGES:
            wall, kb = run_stage(s, project)
            stages[s] = {"wall_s": round(wall, 1), "peak_rss_mb": round(kb / 1024)}
            print(f"  {s:<9} {wall:6.1f} s  {kb / 1024:7.0f} MB", flush=True)
        subprocess.run(["dvc", "commit", "-f", "-q"], cwd=project, env=child_env(), check=True)
        return project

    return ctx.once("project", build)


def run(ctx: Context) -> list[dict]:
    pipeline_project(ctx)
    return [
        result(
            f"stage {s}: wall time (peak memory {v['peak_rss_mb']} MB)",
            v["wall_s"],
            None,
            None,
            "—",
            True,
            "s",
            peak_rss_mb=v["peak_rss_mb"],
            informational=True,
        )
        for s, v in ctx.report["stages"].items()
    ]
