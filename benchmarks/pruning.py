"""What median pruning saves in tuning: two Optuna studies over the default search space on
the digits, with the same TPE seed and number of trials, one with the median pruner and one
without. Counted in epochs: those the pruned study trains until one of its trials reaches the
no-pruning study's best val accuracy (within 0.2 pp), against all the epochs the no-pruning
study trains. Goal ≤ 0.5×.

Each trial is the tune stage's: ``pipeline.stages.tune.suggest`` for the trial's params and
``pipeline.training.fit`` with Optuna's Lightning pruning callback. The sampler and pruners
are built here with the arguments the tune stage uses (TPE with min(5, n_trials) start-up
trials; median with 3 start-up trials and 2 warm-up epochs): the stage keeps its builders
private."""

from __future__ import annotations

from benchmarks.common import Context, digits_prepared, quiet, result

GOAL = 0.5
WITHIN = 0.002  # of the no-pruning study's best val accuracy


def study(params, pruned: bool, data) -> dict:
    """Run one study; each trial's (epochs trained, best val/acc), in trial order."""
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from pipeline.config import direction
    from pipeline.stages.tune import suggest
    from pipeline.training import MetricHistory, fit

    cfg = params.tune
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(5, cfg.n_trials))
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
        if pruned
        else optuna.pruners.NopPruner()
    )
    s = optuna.create_study(direction=direction(cfg.metric), sampler=sampler, pruner=pruner)
    log = []

    def objective(trial) -> float:
        hp, model = suggest(trial, cfg, params.train, params.model)
        history = MetricHistory()
        try:
            with quiet():
                fit(hp, model, data, [PyTorchLightningPruningCallback(trial, cfg.metric), history])
        finally:
            accs = [h["val/acc"] for h in history.history if "val/acc" in h]
            log.append((len(history.history), max(accs, default=0.0)))
        values = [h[cfg.metric] for h in history.history]
        return min(values) if direction(cfg.metric) == "minimize" else max(values)

    s.optimize(objective, n_trials=cfg.n_trials, catch=(Exception,))
    return {"log": log, "epochs": sum(e for e, _ in log), "best_acc": max(a for _, a in log)}


def run(ctx: Context) -> list[dict]:
    import optuna

    from pipeline.config import Params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params, data = Params(), ctx.once("digits", digits_prepared)
    plain, pruned = study(params, False, data), study(params, True, data)
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
