"""`make bench`: Runway against what you would write by hand, side by side, as ratios.

One module per comparison (see COMPARISONS); each runs ours and the reference in this
process, alternating, and reports medians of several rounds: shared machines are noisy, and
ratios of interleaved runs are what survives the noise. Prints the table (metric, ours,
reference, ratio, goal, result), writes ``reports/bench.json`` and exits 1 when a goal is not
met.

    python -m benchmarks.run                      # everything (about 30 minutes on 2 idle cores)
    python -m benchmarks.run --only loader,epoch --reps 3 --out /tmp/bench.json
    python -m benchmarks.run --threads 1          # on a machine others are using
    python -m benchmarks.run --accelerator cuda   # the training comparisons on the GPU

Stopped with ^C or SIGTERM, it says so in one line (exit 130 or 143) after sending a stage it
runs SIGTERM (see common.timed), stopping the team server it started and removing its scratch
folders; it writes no report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Context
from pipeline.io import Terminated, signals_held

# In run order: noop_repro and accuracy reuse the pipeline that stages runs.
COMPARISONS = [
    "epoch",
    "loader",
    "mlflow_logging",
    "imports",
    "stages",
    "noop_repro",
    "accuracy",
    "pruning",
    "team",
    "scale",
    "scale_repro",
]


def table(rows: list[dict]) -> str:
    def show(value, unit: str) -> str:
        return "—" if value is None else f"{value} {unit}".strip()

    width = max(66, *(len(r["metric"]) for r in rows))
    lines = [
        f"{'metric':<{width}} {'ours':>12} {'reference':>12} {'ratio':>7}  {'goal':<16} result"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        verdict = "info" if r.get("informational") else "pass" if r["pass"] else "FAIL"
        lines.append(
            f"{r['metric']:<{width}} {show(r['ours'], r['unit']):>12} "
            f"{show(r['reference'], r['unit']):>12} {show(r['ratio'], ''):>7}  "
            f"{r['goal']:<16} {verdict}"
        )
    return "\n".join(lines)


STOPPING = []  # holds True once SIGTERM came: main() is cleaning up on its way out


def terminated(signum, frame):
    """SIGTERM: stop measuring, and clean up on the way out. Any further SIGTERM is ignored
    (also where code in this process put this handler back after deferring a signal), so the
    team server's stop and the scratch folder's removal are not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not STOPPING:
        STOPPING.append(True)
        raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(COMPARISONS)}")
    parser.add_argument("--reps", type=int, default=5, help="rounds per comparison (default 5)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads, here and in child processes (default: torch's choice); on a "
        "machine others use, fewer threads than cores keep torch from waiting on them",
    )
    parser.add_argument(
        "--accelerator",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the training comparisons train, both sides (default auto: a CUDA GPU when "
        "there is one, else the CPU)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "reports" / "bench.json", help="the JSON report"
    )
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else COMPARISONS
    unknown = sorted(set(chosen) - set(COMPARISONS))
    if unknown:
        parser.error(f"unknown comparison(s) {unknown}; choose from {COMPARISONS}")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the benchmark logs to its scratch store
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.device import available
    from pipeline.io import StageError

    try:
        accelerator = available(args.accelerator, "--accelerator").type  # the rows name it
    except StageError as exc:
        parser.error(str(exc))
    rows, load, previous = [], {}, signal.getsignal(signal.SIGTERM)
    STOPPING.clear()
    try:
        signal.signal(signal.SIGTERM, terminated)
        scratch = tempfile.TemporaryDirectory(prefix="runway-bench-")
        try:
            ctx = Context(Path(scratch.name), args.reps, accelerator=accelerator)
            for name in [c for c in COMPARISONS if c in chosen]:
                print(f"[bench] {name} …", flush=True)
                start, before = time.perf_counter(), os.getloadavg()[0]
                rows += importlib.import_module(f"benchmarks.{name}").run(ctx)
                load[name] = [round(before, 2), round(os.getloadavg()[0], 2)]
                print(
                    f"[bench] {name} done in {time.perf_counter() - start:.0f}s (load average "
                    f"{load[name][0]} before, {load[name][1]} after, {os.cpu_count()} CPUs)",
                    flush=True,
                )
        finally:
            with signals_held():  # a second ^C would leave part of it (GBs at scale)
                scratch.cleanup()
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("[bench] terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(table(rows))
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "accelerator": accelerator,
        },
        "repetitions": args.reps,
        # 1-minute load average before and after each comparison: well above the number of
        # CPUs means others were computing too, and the times (less so the ratios) suffer.
        "load_average": load,
        "results": rows,
        **ctx.report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
