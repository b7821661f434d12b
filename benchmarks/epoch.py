"""Epoch time: the train stage's training against a hand-written PyTorch loop.

Both sides train the same network from the same seed on the same data with the same batch
size, optimiser (fused AdamW, built by the same function) and cosine schedule; both validate
every epoch, log the epoch's metrics to MLflow (a SQLite store), write the state a killed run
resumes from at every epoch end and the best weights when val/loss improves, each file
written beside its path and moved into place. Ours is ``pipeline.training.fit`` with the
train stage's callbacks and MLflow logger. For information, the digits also get the same
against a hand loop that keeps the best weights in memory and writes no file.

Two workloads: the digits (1,257 training images of 8×8, batch 64, whole epochs) and an
MNIST-sized made-up set (60,000 images of 1×28×28, batch 128). A whole MNIST-sized epoch takes
about 90 s on 2 cores, so there both sides train the first ``TRAIN_BATCHES`` batches of each
shuffled epoch and validate on the first ``VAL_BATCHES`` (Lightning's ``limit_train_batches``
and ``limit_val_batches``; the hand loop stops at the same counts).

Each round trains each side once, alternating which goes first; an epoch's time runs from one
epoch's start to the next's (so whatever Lightning does between epochs counts), and the first
epoch (warm-up) is dropped. The ratio is the median of the rounds' ratios; the digits rows run
at least ``SHORT_RUN_ROUNDS`` rounds (``benchmarks.common``). For information, the
digits also get the Lightning loop alone against a bare hand loop (no logging, no callbacks),
the same with the mlp in ms per optimizer step (its steps take so little compute that the
difference is what Lightning's loop costs per step, which no model change removes), and the
train stage with and without ``fit(..., plain_cuda_check=...)`` while that option
exists: the lifting of ``PYTORCH_NVML_BASED_CUDA_CHECK`` (set by importing Lightning) during
a fit. The hand loop always runs without that variable, as in a process without Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from benchmarks.common import (
    SHORT_RUN_ROUNDS,
    Context,
    digits_prepared,
    interleaved,
    mnist_sized,
    quiet,
    ratio_row,
)

GOAL = 1.10
TRAIN_BATCHES, VAL_BATCHES = 20, 2  # per epoch, MNIST-sized set


@dataclass
class Workload:
    name: str
    data: object  # pipeline.data.loader.Prepared
    batch_size: int
    epochs: int
    train_batches: int | None = None  # None: whole epochs
    val_batches: int | None = None
    accelerator: str = "cpu"  # train.accelerator: auto, cpu or cuda (make bench --accelerator)
    model: str = "cnn"  # model.name

    def mp(self):
        from pipeline.config import ModelParams

        return ModelParams(name=self.model)

    def hp(self, **changes):
        from pipeline.config import TrainParams

        values = {"batch_size": self.batch_size, "max_epochs": self.epochs}
        values |= {"patience": self.epochs, "accelerator": self.accelerator, **changes}
        return TrainParams(**values)

    def steps(self) -> int:
        """Optimizer steps per epoch."""
        whole = math.ceil(len(self.data.tensors["train"][0]) / self.batch_size)
        return whole if self.train_batches is None else min(whole, self.train_batches)

    def limits(self) -> list:
        """The callbacks that make Lightning stop at the workload's batch counts."""
        return (
            []
            if self.train_batches is None
            else [batch_limit(self.train_batches, self.val_batches)]
        )


def epoch_clock():
    """A Lightning callback: the start of every training epoch and the end of training, so
    that epoch i lasts ``marks[i + 1] - marks[i]``, validation and epoch-end work included;
    and each epoch's val/loss, to check that both sides computed the same."""
    import lightning.pytorch as pl

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.val_losses: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.marks.append(time.perf_counter())

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.val_losses.append(trainer.callback_metrics["val/loss"].item())

        def on_train_end(self, trainer, pl_module) -> None:
            self.marks.append(time.perf_counter())

        def epochs(self) -> list[float]:
            return [b - a for a, b in itertools.pairwise(self.marks)]

    return EpochClock()


def batch_limit(train: int, val: int):
    """Lightning's ``limit_train_batches``/``limit_val_batches`` for a fit whose Trainer
    ``pipeline.training.fit`` builds: set on the trainer before its loops read them."""
    import lightning.pytorch as pl

    class BatchLimit(pl.Callback):
        def setup(self, trainer, pl_module, stage: str) -> None:
            trainer.limit_train_batches, trainer.limit_val_batches = train, val

    return BatchLimit()


def stage_fit(
    work: Workload,
    store: Path,
    logging: bool = True,
    hp=None,
    uri: str | None = None,
    **fit_options,
):
    """The train stage's training: its callbacks and MLflow logger (as the stage builds them)
    around ``pipeline.training.fit``. Returns seconds per epoch, val/loss per epoch, and
    seconds of the whole fit. ``hp``: changes to the workload's train section; ``uri``: the
    tracking URI (default: a sqlite store in ``store``)."""
    from pipeline import tracking
    from pipeline.stages.train import CheckpointedLogger, Resume, train_callbacks
    from pipeline.training import fit

    hp = work.hp(**(hp or {}))
    resume = Resume("bench", store / f"resume-{time.monotonic_ns()}")
    callbacks, _ = train_callbacks(hp, resume)
    clock = epoch_clock()
    logger = False
    if logging:
        uri = uri or f"sqlite:///{store}/mlflow.db"
        logger = CheckpointedLogger(
            experiment_name="bench", tracking_uri=uri, run_name="bench", synchronous=False
        )
    start = time.perf_counter()
    # As the train stage logs: asynchronously, every metric stored when the fit ends.
    with quiet(), tracking.async_metrics() if logging else contextlib.nullcontext():
        fit(
            hp,
            work.mp(),
            work.data,
            [*callbacks, clock, *work.limits()],
            logger=logger,
            default_root_dir=str(store),
            **fit_options,
        )
    seconds = time.perf_counter() - start
    resume.finished()  # removes its checkpoints
    return clock.epochs(), clock.val_losses, seconds


def bare_fit(work: Workload, store: Path) -> tuple[list[float], list[float]]:
    """``pipeline.training.fit`` with no logger and no callbacks but the clock."""
    from pipeline.training import fit

    clock = epoch_clock()
    with quiet():
        fit(
            work.hp(),
            work.mp(),
            work.data,
            [clock, *work.limits()],
            default_root_dir=str(store),
        )
    return clock.epochs(), clock.val_losses


def hand_loop(
    work: Workload, store: Path | None = None, files: bool = True
) -> tuple[list[float], list[float]]:
    """What you would write by hand, in plain PyTorch: seconds per epoch, and val/loss per
    epoch.

    Moves the data to the device once, shuffles with a seeded generator and indexes each batch
    from the tensors there, steps the optimizer ours builds (fused AdamW) at train.lr scaled to
    the batch by the same rule (``train.lr_scaling``) and, once per epoch, the cosine schedule;
    checks the epoch's loss is finite; validates in batches of ``max(batch_size, 512)``, as
    ours does, and prints a line. With ``store`` it also does what the train stage does each
    epoch: logs the epoch's metrics with ``mlflow.log_metrics``, keeps the best weights by
    val/loss, counting epochs without improvement for early stopping, and (``files``) writes
    ``last.pt`` (weights, optimizer, schedule, epoch, random states: what a resume needs) at
    every epoch end and ``best.pt`` (weights) on improvement, each written beside its path and
    moved into place, as the stage's ``last.ckpt`` and ``best.ckpt`` are. Without ``files``
    the best weights are a copy in memory."""
    import torch
    from torch.nn import functional as F

    from pipeline.device import resolve
    from pipeline.io import atomic_path
    from pipeline.models import build_net, model_spec
    from pipeline.models.module import build_optimizer, scaled_lr
    from pipeline.training import fit_environment, fit_scope

    def save(obj, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)

    hp, mp = work.hp(), work.mp()
    device = resolve(hp.accelerator)
    (x, y), (xv, yv) = (
        tuple(t.to(device) for t in work.data.tensors[split]) for split in ("train", "val")
    )
    torch.manual_seed(hp.seed)
    net = build_net(model_spec(mp.name, work.data.manifest, mp.channels, mp.dropout)).to(device)
    lr = scaled_lr(hp.lr, hp.optimizer, hp.lr_scaling, hp.batch_size, hp.lr_batch_size)
    opt = build_optimizer(hp.optimizer, list(net.parameters()), lr, hp.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.max_epochs)
    generator = torch.Generator().manual_seed(hp.seed)
    bs, val_bs = hp.batch_size, max(hp.batch_size, 512)
    train_stop = len(x) if work.train_batches is None else work.train_batches * bs
    val_stop = len(xv) if work.val_batches is None else work.val_batches * val_bs
    times, val_losses, best, best_weights, waited = [], [], float("inf"), None, 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet())
        # The environment and determinism flags a fit has (deterministic cuBLAS on a GPU,
        # and no PYTORCH_NVML_BASED_CUDA_CHECK, as in a process that never imported
        # Lightning, which sets it), put back afterwards.
        stack.enter_context(fit_scope(fit_environment(hp)))
        torch.use_deterministic_algorithms(
            bool(hp.deterministic), warn_only=hp.deterministic == "warn"
        )
        if store is not None:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
            mlflow.set_experiment("bench-hand-loop")
            stack.enter_context(mlflow.start_run())
        for epoch in range(hp.max_epochs):
            start = time.perf_counter()
            net.train()
            order = torch.randperm(len(x), generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
            for i in range(0, min(train_stop, len(x)), bs):
                batch = order[i : i + bs]
                xb, yb = x[batch], y[batch]
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(yb)
                correct += (logits.argmax(1) == yb).sum()
                seen += len(yb)
            schedule.step()
            metrics = {"train/loss": loss_sum.item() / seen, "train/acc": correct.item() / seen}
            if not math.isfinite(metrics["train/loss"]):
                raise RuntimeError(f"training diverged: train/loss is {metrics['train/loss']}")
            net.eval()
            loss_sum = torch.zeros((), device=device)
            correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
            with torch.no_grad():
                for i in range(0, min(val_stop, len(xv)), val_bs):
                    logits, yb = net(xv[i : i + val_bs]), yv[i : i + val_bs]
                    loss_sum += F.cross_entropy(logits, yb, reduction="sum")
                    correct += (logits.argmax(1) == yb).sum()
                    seen += len(yb)
            metrics |= {"val/loss": loss_sum.item() / seen, "val/acc": correct.item() / seen}
            print(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if store is not None:
                mlflow.log_metrics(metrics, step=epoch)
                if metrics["val/loss"] < best:
                    best, waited = metrics["val/loss"], 0
                    if files:
                        save(net.state_dict(), store / "best.pt")
                    else:
                        best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    waited += 1
                if files:
                    state = {
                        "epoch": epoch,
                        "model": net.state_dict(),
                        "optimizer": opt.state_dict(),
                        "schedule": schedule.state_dict(),
                        "rng": {"torch": torch.get_rng_state(), "shuffle": generator.get_state()},
                    }
                    save(state, store / "last.pt")
            times.append(time.perf_counter() - start)
            val_losses.append(metrics["val/loss"])
            if waited >= hp.patience:
                break
    del best_weights
    return times, val_losses


def same(a: list[float], b: list[float]) -> bool:
    close = (math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4) for x, y in zip(a, b, strict=True))
    return len(a) == len(b) and all(close)


def compare(
    metric: str, ours, reference, rounds: int, goal: float | None, per_step: Workload | None = None
) -> dict:
    """Interleaved rounds of two training functions that return (seconds per epoch, val/loss
    per epoch). A run counts its median epoch, the first (warm-up) epoch left out; with
    ``per_step``, that epoch over the workload's optimizer steps, in ms. The row fails if the
    runs did not all compute the same val losses: then they did different work."""
    losses = []
    steps = 1 if per_step is None else per_step.steps()

    def median_epoch(train):
        def measure() -> float:
            times, val_losses = train()
            losses.append(val_losses)
            return statistics.median(times[1:]) / steps

        return measure

    o, r = interleaved(median_epoch(ours), median_epoch(reference), rounds)
    if per_step is None:
        row = ratio_row(metric, o, r, goal)
    else:
        row = ratio_row(metric, o, r, goal, unit="ms", scale=1e3)
    row["same_val_losses"] = all(same(losses[0], other) for other in losses)
    row["pass"] = row["pass"] and row["same_val_losses"]
    return row


def cuda_check(nvml: bool, calls: int = 2000):
    """A measurement: seconds per ``torch.cuda.is_available()``, which AdamW calls on every
    ``step()`` (once per step in torch 2.14), with ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (set by
    importing Lightning: each call asks NVML) or without it (what ``plain_cuda_check`` gives a
    fit)."""
    import torch

    def measure() -> float:
        with mock.patch.dict(os.environ, {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}):
            if not nvml:
                del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
            start = time.perf_counter()
            for _ in range(calls):
                torch.cuda.is_available()
            return (time.perf_counter() - start) / calls

    return measure


def workloads(ctx: Context) -> list[Workload]:
    where = "" if ctx.accelerator == "cpu" else f", {ctx.accelerator}"
    return [
        Workload(
            f"digits 1,257×8×8, batch 64{where}",
            ctx.once("digits", digits_prepared),
            64,
            8,
            accelerator=ctx.accelerator,
        ),
        Workload(
            f"MNIST-sized 60,000×1×28×28, batch 128, {TRAIN_BATCHES}+{VAL_BATCHES} "
            f"batches/epoch{where}",
            ctx.once("mnist-sized", mnist_sized),
            128,
            4,
            TRAIN_BATCHES,
            VAL_BATCHES,
            accelerator=ctx.accelerator,
        ),
    ]


def run(ctx: Context) -> list[dict]:
    import inspect

    from pipeline.training import fit

    store, rows = ctx.scratch, []
    digits, mnist = workloads(ctx)
    many = max(ctx.reps, SHORT_RUN_ROUNDS)
    for work, rounds in ((digits, many), (mnist, ctx.reps)):
        rows.append(
            compare(
                f"train-stage epoch vs hand loop, both log to MLflow and checkpoint ({work.name})",
                lambda w=work: stage_fit(w, store)[:2],
                lambda w=work: hand_loop(w, store),
                rounds,
                GOAL,
            )
        )
    rows.append(
        compare(
            "  (digits: train stage vs hand loop keeping the best weights in memory, no files)",
            lambda: stage_fit(digits, store)[:2],
            lambda: hand_loop(digits, store, files=False),
            many,
            None,
        )
    )
    rows.append(
        compare(
            "  (digits: Lightning loop alone vs bare hand loop)",
            lambda: bare_fit(digits, store),
            lambda: hand_loop(digits),
            many,
            None,
        )
    )
    # The mlp's steps take little compute, so the difference is what Lightning's loop costs
    # per optimizer step whatever the model: over 10 % of an epoch whose steps take under
    # ten times that.
    small = dataclasses.replace(digits, model="mlp")
    rows.append(
        compare(
            "  (digits, mlp: time per optimizer step, Lightning loop alone vs bare hand loop; "
            "the difference is Lightning's cost per step)",
            lambda: bare_fit(small, store),
            lambda: hand_loop(small),
            many,
            None,
            per_step=small,
        )
    )
    if "plain_cuda_check" in inspect.signature(fit).parameters:
        rows.append(
            compare(
                "  (digits: train stage with fit's plain_cuda_check vs without)",
                lambda: stage_fit(digits, store, plain_cuda_check=True)[:2],
                lambda: stage_fit(digits, store, plain_cuda_check=False)[:2],
                ctx.reps,
                None,
            )
        )
        lifted, checked = interleaved(cuda_check(False), cuda_check(True), max(ctx.reps, 5))
        rows.append(
            ratio_row(
                "  (what it lifts, once per optimiser step: torch.cuda.is_available() without "
                "vs with NVML)",
                lifted,
                checked,
                None,
                unit="µs",
                scale=1e6,
            )
        )
    return rows
