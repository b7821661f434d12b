"""`make bench`: Runway against what you would write by hand, side by side, as ratios.

Each comparison runs ours and the reference in this one process (or one pipeline run),
alternating, and reports medians of at least five repetitions: shared machines are noisy and
ratios of interleaved medians are what survives the noise. Prints a table (metric, ours,
reference, ratio, goal, pass/fail) and writes ``reports/bench.json``; it also runs the default
pipeline stage by stage in a scratch copy and records each stage's wall time and peak memory
(the kernel's high-water mark of resident memory, VmHWM).

    python -m benchmarks.run              # everything (about 10 minutes on 2 cores)
    python -m benchmarks.run --only loader,imports
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "bench.json"
REPS = 5
STAGES = ["ingest", "validate", "tune", "train", "evaluate", "register"]


def result(metric, ours, reference, ratio, goal, passed, unit="", **extra) -> dict:
    return {
        "metric": metric,
        "ours": ours,
        "reference": reference,
        "ratio": ratio,
        "goal": goal,
        "pass": bool(passed),
        "unit": unit,
        **extra,
    }


# --- shared set-up --------------------------------------------------------------------


def digits_prepared():
    """The digits, cleaned and split exactly as the pipeline does, in memory."""
    from pipeline.config import SplitParams
    from pipeline.data import digits
    from pipeline.data.loader import to_tensors
    from pipeline.data.table import Manifest
    from pipeline.training import Prepared
    from pipeline.validation.split import assign_splits

    loaded = digits.load()
    table = loaded.pop("table")
    splits = assign_splits(table["sample_id"], SplitParams())
    tables = {s: table[splits == s].reset_index(drop=True) for s in ("train", "val", "test")}
    manifest = Manifest("digits", len(table), "sha256:bench", **loaded)
    tensors = {s: to_tensors(t, manifest.image_shape) for s, t in tables.items()}
    return Prepared(manifest, tables, tensors)


def epoch_timer():
    """A Lightning callback collecting seconds per epoch (training plus validation)."""
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and hasattr(self, "_start"):
                self.times.append(time.perf_counter() - self._start)

    return EpochTimer()


def ours_fit(
    data, epochs: int, store: Path, logging: bool = True, patience: int | None = None
) -> tuple[list[float], float]:
    """The train stage's fit: its callbacks, MLflow logger, checkpoints. Epoch times, total."""
    import contextlib
    import io

    from pipeline.config import ModelParams, TrainParams
    from pipeline.stages.train import BatchedMLFlowLogger, Resume, train_callbacks
    from pipeline.training import fit

    hp = TrainParams(max_epochs=epochs, patience=patience or epochs, accelerator="cpu")
    resume = Resume("bench", store / f"resume-{time.monotonic_ns()}")
    callbacks, _ = train_callbacks(hp, resume)
    timer = epoch_timer()
    logger = False
    if logging:
        logger = BatchedMLFlowLogger(
            experiment_name="bench", tracking_uri=f"sqlite:///{store}/mlflow.db", run_name="bench"
        )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        fit(hp, ModelParams(), data, [*callbacks, timer], logger=logger)
    total = time.perf_counter() - start
    shutil.rmtree(resume.dir, ignore_errors=True)
    return timer.times, total


def reference_fit(data, epochs: int, store: Path | None = None) -> list[float]:
    """A hand-written loop: same network, optimiser, schedule, seed and batch size, batches
    sliced from in-memory tensors, a validation pass and a printed line per epoch.

    With ``store``, it does per epoch what the train stage does and anyone would write by
    hand: logs the epoch's metrics with ``mlflow.log_metrics`` (SQLite store in ``store``) and
    keeps a copy of the best weights, counting epochs without improvement."""
    import contextlib
    import io

    import torch
    from torch.nn import functional as F

    from pipeline.config import ModelParams, TrainParams
    from pipeline.models import build_net, model_spec
    from pipeline.training import set_seeds

    hp, mp = TrainParams(), ModelParams()
    set_seeds(hp.seed)
    net = build_net(model_spec(mp.name, data.manifest, mp.channels, mp.dropout))
    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    x, y = data.tensors["train"]
    xv, yv = data.tensors["val"]
    generator = torch.Generator().manual_seed(hp.seed)
    times = []
    best, best_weights, waited = float("inf"), None, 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if store is not None:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
            mlflow.set_experiment("bench-reference")
            stack.enter_context(mlflow.start_run())
        for epoch in range(epochs):
            start = time.perf_counter()
            net.train()
            order = torch.randperm(len(x), generator=generator)
            xs, ys = x[order], y[order]
            total = torch.zeros(())
            for i in range(0, len(xs), hp.batch_size):
                logits = net(xs[i : i + hp.batch_size])
                loss = F.cross_entropy(logits, ys[i : i + hp.batch_size])
                if not torch.isfinite(loss):
                    raise RuntimeError(f"loss is {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(logits)
            schedule.step()
            net.eval()
            with torch.no_grad():
                logits = net(xv)
                val_loss = F.cross_entropy(logits, yv).item()
                val_acc = (logits.argmax(1) == yv).float().mean().item()
            train_loss = total.item() / len(x)
            print(f"epoch {epoch + 1}: {train_loss:.4f} {val_loss:.4f} {val_acc:.4f}")
            if store is not None:
                metrics = {"train/loss": train_loss, "val/loss": val_loss, "val/acc": val_acc}
                mlflow.log_metrics(metrics, step=epoch)
                if val_loss < best:
                    best, waited = val_loss, 0
                    best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    waited += 1
            times.append(time.perf_counter() - start)
    del best_weights
    return times


def lightning_fit(data, epochs: int) -> list[float]:
    """Our fit with nothing around it: no logger, no callbacks but the epoch timer."""
    import contextlib
    import io

    from pipeline.config import ModelParams, TrainParams
    from pipeline.training import fit

    hp = TrainParams(max_epochs=epochs, patience=epochs, accelerator="cpu")
    timer = epoch_timer()
    with contextlib.redirect_stdout(io.StringIO()):
        fit(hp, ModelParams(), data, [timer], logger=False)
    return timer.times


# --- the comparisons ------------------------------------------------------------------


def bench_epoch(ctx: dict) -> list[dict]:
    """Rounds of (train stage, hand loop), 5 epochs each with the first (warm-up) dropped;
    the ratio is the median of the rounds' ratios, so a machine that slows down between rounds
    shifts both sides of a ratio alike. Both sides log every epoch to MLflow and keep the best
    weights; the train stage also keeps its resume checkpoint. A second row compares the bare
    Lightning loop with the bare hand loop (no logging, no callbacks): the framework alone."""
    data, store = ctx["data"], ctx["store"]
    rows = {"stage": ([], [], []), "bare": ([], [], [])}
    for _ in range(max(REPS, 6)):
        for name, ours, ref in (
            ("stage", lambda: ours_fit(data, 5, store)[0], lambda: reference_fit(data, 5, store)),
            ("bare", lambda: lightning_fit(data, 5), lambda: reference_fit(data, 5)),
        ):
            o, r = statistics.median(ours()[1:]), statistics.median(ref()[1:])
            rows[name][0].append(o)
            rows[name][1].append(r)
            rows[name][2].append(o / r)
    out = []
    for name, metric, goal in (
        ("stage", "train-stage epoch time vs hand loop, both logging to MLflow", "<= 1.10x"),
        ("bare", "  (Lightning loop alone vs bare hand loop; for information)", None),
    ):
        ours, ref, ratios = rows[name]
        ratio = statistics.median(ratios)
        out.append(
            result(
                metric,
                round(statistics.median(ours), 4),
                round(statistics.median(ref), 4),
                round(ratio, 3),
                goal or "—",
                ratio <= 1.10 if goal else True,
                "s",
                round_ratios=[round(x, 3) for x in ratios],
                informational=goal is None,
            )
        )
    return out


def bench_loader(ctx: dict) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.loader import TensorBatches

    x, y = ctx["data"].tensors["train"]
    ours_loader = TensorBatches(x, y, 64, shuffle=True, seed=0)
    torch_loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    def epoch(loader) -> float:
        start = time.perf_counter()
        for xb, _ in loader:
            xb.sum()  # touch the batch
        return time.perf_counter() - start

    ours, ref = [], []
    for _ in range(max(REPS, 9)):
        ours.append(epoch(ours_loader))
        ref.append(epoch(torch_loader))
    o, r = statistics.median(ours), statistics.median(ref)
    return result(
        "in-memory loader, one epoch of batches",
        round(o * 1000, 3),
        round(r * 1000, 3),
        round(r / o, 1),
        ">= 3x faster",
        r / o >= 3,
        "ms",
    )


def bench_mlflow(ctx: dict) -> dict:
    """The default training run (train section defaults: up to 40 epochs, early stopping),
    with the train stage's MLflow logger and without; ratio = median of the rounds' ratios."""
    from pipeline.config import TrainParams

    data, store, hp = ctx["data"], ctx["store"], TrainParams()
    on, off, ratios = [], [], []
    for _ in range(REPS):
        on.append(ours_fit(data, hp.max_epochs, store, True, hp.patience)[1])
        off.append(ours_fit(data, hp.max_epochs, store, False, hp.patience)[1])
        ratios.append(on[-1] / off[-1])
    ratio = statistics.median(ratios)
    return result(
        "default training run, MLflow logging on vs off",
        round(statistics.median(on), 3),
        round(statistics.median(off), 3),
        round(ratio, 3),
        "<= 1.05x",
        ratio <= 1.05,
        "s",
        round_ratios=[round(x, 3) for x in ratios],
    )


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def import_cost(code: str) -> tuple[float, set[str]]:
    """Seconds spent importing what ``code`` imports (cumulative, top level), and the set
    of top-level packages imported."""
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


def bench_imports(ctx: dict) -> list[dict]:
    ref_times = []
    stage_times = {s: [] for s in STAGES}
    packages = {}
    for _ in range(REPS):
        ref_times.append(import_cost("import torch; import lightning")[0])
        for s in STAGES:
            seconds, packages[s] = import_cost(f"import pipeline.stages.{s}")
            stage_times[s].append(seconds)
    r = statistics.median(ref_times)
    rows = []
    for s in STAGES:
        o = statistics.median(stage_times[s])
        torch_free = "torch" not in packages[s]
        if s in ("ingest", "validate"):
            goal, passed = "no torch import", torch_free
        else:
            goal, passed = "<= 1.3x", o / r <= 1.3
        rows.append(
            result(
                f"import pipeline.stages.{s}" + ("" if torch_free else " (imports torch)"),
                round(o, 3),
                round(r, 3),
                round(o / r, 2),
                goal,
                passed,
                "s",
            )
        )
    return rows


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def timed(cmd: list[str], cwd: Path, env: dict | None = None):
    """Wall seconds of one child process, and its completed-process record."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            cmd, cwd=cwd, env={**_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-3000:]}")
    return wall, subprocess.CompletedProcess(cmd, proc.returncode, text, "")


# Runs a stage module and, as the interpreter exits, records the kernel's high-water mark of
# its resident memory (VmHWM). wait4's ru_maxrss would not do: Linux carries the parent's
# resident size across fork+exec into the child's maximum, and this process holds torch.
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


def run_stage_measured(stage: str, cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak resident memory (kB) of ``python -m pipeline.stages.<stage>``."""
    peak = cwd / f".peak-{stage}"
    cmd = [sys.executable, "-c", PEAK_RSS, f"pipeline.stages.{stage}"]
    wall, _ = timed(cmd, cwd, {"RUNWAY_BENCH_PEAK": str(peak)})
    kb = int(peak.read_text())
    peak.unlink()
    return wall, kb


def bench_pipeline(ctx: dict) -> list[dict]:
    """The default pipeline, stage by stage, in a scratch copy; then no-op repro and SVC."""
    from tests.conftest import copy_project  # the same scratch copy the tests use

    project = copy_project(ctx["store"] / "project")
    stages = {}
    for s in STAGES:
        wall, rss = run_stage_measured(s, project)
        stages[s] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss / 1024)}
        print(f"  {s:<9} {wall:6.1f} s  {rss / 1024:7.0f} MB", flush=True)
    ctx["stages"] = stages
    subprocess.run(["dvc", "commit", "-f", "-q"], cwd=project, env=_env(), check=True)
    noop = []
    for _ in range(REPS):
        wall, done = timed(["dvc", "repro"], project)
        assert "Running stage" not in done.stdout, done.stdout
        noop.append(wall)
    n = statistics.median(noop)
    rows = [result("no-op `dvc repro`", round(n, 2), None, None, "<= 1.5 s", n <= 1.5, "s")]

    metrics = json.loads((project / "reports/evaluate/metrics.json").read_text())["test"]
    from pipeline.baseline import svc_baseline

    svc = svc_baseline(
        [0.1, 1, 10, 100], ["scale", 0.0003, 0.001, 0.003, 0.01], project / "data/prepared"
    )
    o, r = metrics["accuracy"], svc["test_accuracy"]
    rows.append(
        result(
            "test accuracy, default pipeline vs RBF SVC (C, gamma tuned on val)",
            round(o, 4),
            round(r, 4),
            round(o / r, 4),
            ">= SVC",
            o >= r,
            "",
            svc={"C": svc["C"], "gamma": svc["gamma"]},
        )
    )
    return rows


def bench_pruning(ctx: dict) -> dict:
    """Two studies with the same TPE seed and trial count, median pruner vs none: the epochs
    the pruned study trains until one of its trials reaches the no-pruning study's best val
    accuracy (within 0.2 pp), against all the epochs the no-pruning study trains."""
    import contextlib
    import io

    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from pipeline.config import Params
    from pipeline.stages.tune import _pruner, _sampler, suggest
    from pipeline.training import MetricHistory, fit

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()

    def study(pruner_name: str) -> dict:
        cfg = params.tune.model_copy(update={"pruner": pruner_name})
        s = optuna.create_study(direction="minimize", sampler=_sampler(cfg), pruner=_pruner(cfg))
        log = []  # (epochs trained, best val/acc of the trial)

        def objective(trial):
            hp, model = suggest(trial, cfg, params.train, params.model)
            history = MetricHistory()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    fit(
                        hp,
                        model,
                        ctx["data"],
                        [PyTorchLightningPruningCallback(trial, monitor=cfg.metric), history],
                    )
            finally:
                accs = [h["val/acc"] for h in history.history if "val/acc" in h]
                log.append((len(history.history), max(accs) if accs else 0.0))
            return min(h[cfg.metric] for h in history.history)

        s.optimize(objective, n_trials=cfg.n_trials, catch=(Exception,))
        return {"log": log, "epochs": sum(e for e, _ in log), "best_acc": max(a for _, a in log)}

    plain, pruned = study("none"), study("median")
    target = plain["best_acc"] - 0.002  # within 0.2 pp of the no-pruning study's best
    until = None
    spent = 0
    for epochs, acc in pruned["log"]:
        spent += epochs
        if acc >= target:
            until = spent
            break
    ratio = None if until is None else until / plain["epochs"]
    return result(
        f"tuning with median pruning: epochs until it matches the no-pruning study's best "
        f"val acc ({params.tune.n_trials} trials, same TPE seed)",
        until,
        plain["epochs"],
        None if ratio is None else round(ratio, 3),
        "<= 0.5x epochs",
        ratio is not None and ratio <= 0.5,
        "epochs",
        best_val_acc={"pruned": pruned["best_acc"], "none": plain["best_acc"]},
        pruned_total_epochs=pruned["epochs"],
        trials={"pruned": pruned["log"], "none": plain["log"]},
    )


BENCHES: dict[str, Callable[[dict], dict | list[dict]]] = {
    "epoch": bench_epoch,
    "loader": bench_loader,
    "mlflow": bench_mlflow,
    "imports": bench_imports,
    "pipeline": bench_pipeline,
    "pruning": bench_pruning,
}


def table(rows: list[dict]) -> str:
    def show(v, unit):
        return "—" if v is None else f"{v} {unit}".strip()

    lines = [
        f"{'metric':<66} {'ours':>12} {'reference':>12} {'ratio':>7}  {'goal':<26} result",
        "-" * 136,
    ]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']}"
        lines.append(
            f"{r['metric']:<66} {show(r['ours'], r['unit']):>12} "
            f"{show(r['reference'], r['unit']):>12} {ratio:>7}  {r['goal']:<26} "
            + ("pass" if r["pass"] else "FAIL")
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(BENCHES)
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHES)}")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the benchmark logs to its scratch store
    import torch

    with tempfile.TemporaryDirectory(prefix="runway-bench-") as scratch:
        ctx = {"store": Path(scratch), "data": digits_prepared()}
        rows = []
        for name in chosen:
            print(f"[bench] {name} …", flush=True)
            start = time.perf_counter()
            out = BENCHES[name](ctx)
            rows += out if isinstance(out, list) else [out]
            print(f"[bench] {name} done in {time.perf_counter() - start:.0f}s", flush=True)
    print()
    print(table(rows))
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        },
        "repetitions": REPS,
        "results": rows,
        "stages": ctx.get("stages", {}),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    if ctx.get("stages"):
        print("\nstage      wall     peak RSS")
        for s, v in ctx["stages"].items():
            print(f"{s:<9} {v['wall_s']:6.1f} s {v['peak_rss_mb']:7d} MB")
    print(f"\nwrote {REPORT.relative_to(ROOT)}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
