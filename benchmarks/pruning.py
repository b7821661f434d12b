"""What median pruning saves in tuning: two Optuna studies over the default search space on
the digits, with the same TPE seed and number of trials, one with the median pruner and one
without. Counted in epochs: those the pruned study trains until one of its trials reaches the
no-pruning study's best val accuracy (within 0.2 pp), against all the epochs the no-pruning
study trains. Goal ≤ 0.5×.

The studies are the tune stage's own: ``open_study`` (its sampler and pruner; here in a
scratch SQLite store), ``suggest`` for each trial's params, ``pipeline.training.fit`` with
its pruning callback, and ``optimize``."""

from __future__ import annotations

from benchmarks.common import Context, digits_prepared, quiet, result

GOAL = 0.5
WITHIN = 0.002  # of the no-pruning study's best val accuracy


def study(ctx: Context, params, pruner: str) -> dict:
    """Run one new study with ``tune.pruner: <pruner>``; each trial's (epochs trained, best
    val/acc), in trial order. Its trials are the stage's (``tune.val_check_interval``: 1):
    a trial's value is :func:`~pipeline.stages.tune.trial_value` of its reported checks."""
    from pipeline.stages.tune import open_study, optimize, pruning_callback, suggest, trial_value
    from pipeline.training import MetricHistory, fit

    params = params.model_copy(update={"tune": params.tune.model_copy(update={"pruner": pruner})})
    cfg, data = params.tune, ctx.once("digits", digits_prepared)
    with quiet():
        s, todo = open_study(params, f"bench-{pruner}", f"sqlite:///{ctx.scratch}/optuna.db")
    log = []

    def objective(trial) -> float:
        hp, model = suggest(trial, cfg, params.train, params.model)
        history = MetricHistory()
        pruning = pruning_callback(trial, cfg.metric, cfg.checks_per_epoch)
        try:
            with quiet():
                fit(hp, model, data, [history, pruning], checks_per_epoch=cfg.checks_per_epoch)
        finally:
            accs = [h["val/acc"] for h in history.history if "val/acc" in h]
            log.append((len(history.history) // cfg.checks_per_epoch, max(accs, default=0.0)))
        return trial_value(cfg.metric, pruning.steps, history.history)

    optimize(s, objective, todo)
    return {"log": log, "epochs": sum(e for e, _ in log), "best_acc": max(a for _, a in log)}


def run(ctx: Context) -> list[dict]:
    import optuna

    from pipeline.config import Params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    plain, pruned = study(ctx, params, "none"), study(ctx, params, "median")
    until, spent = None, 0
    for epochs, acc in pruned["log"]:
        spent += epochs
        if acc >= plain["best_acc"] - WITHIN:
            until = spent
            break
    ratio = None if until is None else until / plain["epochs"]
    return [
        result(
            f"tuning with median pruning: epochs until it matches the no-pruning study's best "
            f"val acc ({params.tune.n_trials} trials, same TPE seed)",
            until,
            plain["epochs"],
            None if ratio is None else round(ratio, 3),
            f"<= {GOAL}x epochs",
            ratio is not None and ratio <= GOAL,
            "epochs",
            best_val_acc={"pruned": pruned["best_acc"], "none": plain["best_acc"]},
            pruned_total_epochs=pruned["epochs"],
            trials={"pruned": pruned["log"], "none": plain["log"]},
        )
    ]
