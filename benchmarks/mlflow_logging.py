"""The cost of MLflow logging: the default training run (the train section's defaults: up to
10 epochs with early stopping, on the digits) with the train stage's MLflow logger and without
it. Rounds alternate the two; the ratio is the median of the rounds' ratios. Goal ≤ 1.05×.

At least ``SHORT_RUN_ROUNDS`` rounds (``benchmarks.common``): a run takes about 2 s, of which
the logger's calls and the store's writes take 15–40 ms of CPU; one round's ratio ranges from
0.85× to 1.35× on 2 cores, the spread being the machine's, and the median of five rounds moved
between 0.98× and 1.09× from one benchmark run to the next."""

from __future__ import annotations

from benchmarks.common import SHORT_RUN_ROUNDS, Context, digits_prepared, interleaved, ratio_row
from benchmarks.epoch import Workload, stage_fit

GOAL = 1.05


def run(ctx: Context) -> list[dict]:
    from pipeline.config import TrainParams

    hp = TrainParams()
    work = Workload("digits", ctx.once("digits", digits_prepared), hp.batch_size, hp.max_epochs)
    on, off = interleaved(
        lambda: stage_fit(work, ctx.scratch, True, {"patience": hp.patience})[2],
        lambda: stage_fit(work, ctx.scratch, False, {"patience": hp.patience})[2],
        max(ctx.reps, SHORT_RUN_ROUNDS),
    )
    return [ratio_row("default training run, MLflow logging on vs off", on, off, GOAL)]
