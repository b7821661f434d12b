"""The cost of MLflow logging: the default training run (the train section's defaults: up to
10 epochs with early stopping, on the digits) with the train stage's MLflow logger and without
it. Rounds alternate the two; the ratio is the median of the rounds' ratios. Goal ≤ 1.05×."""

from __future__ import annotations

from benchmarks.common import Context, digits_prepared, interleaved, ratio_row
from benchmarks.epoch import Workload, stage_fit

GOAL = 1.05


def run(ctx: Context) -> list[dict]:
    from pipeline.config import TrainParams

    hp = TrainParams()
    work = Workload("digits", ctx.once("digits", digits_prepared), hp.batch_size, hp.max_epochs)
    on, off = interleaved(
        lambda: stage_fit(work, ctx.scratch, True, {"patience": hp.patience})[2],
        lambda: stage_fit(work, ctx.scratch, False, {"patience": hp.patience})[2],
        ctx.reps,
    )
    return [ratio_row("default training run, MLflow logging on vs off", on, off, GOAL)]
