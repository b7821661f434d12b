"""Tune: an Optuna study over ``tune.search_space``, each trial a short Lightning training.

The study (TPE or random sampler seeded from params; median, Hyperband or no pruner) lives in
``mlruns/optuna.db``. Its name is derived from everything that makes trials comparable (search
space, metric, epochs, sampler, pruner, seed, the base train section and the DVC hash of the
prepared data), so re-running the same study resumes it and a change starts a new one.
MLflow gets one parent run and one nested run per trial, tagged with the trial's final state.
Writes ``reports/tune/best_params.json`` (an input of train, never written back to
params.yaml), ``trials.csv`` and ``optimization_history.png``. ``tune.n_trials: 0`` skips
tuning: best_params.json is ``{}`` and train uses params.yaml as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from pipeline import tracking
from pipeline.config import (
    ModelParams,
    Params,
    TrainParams,
    TuneParams,
    direction,
    load_params,
    with_tuned,
)
from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, atomic_dir, atomic_path, run_stage, write_json

REPORT_DIR = Path("reports/tune")
STUDY_STORAGE = f"sqlite:///{tracking.MLRUNS_DIR}/optuna.db"


def study_name(params: Params, data_hash: str) -> str:
    """Same inputs → same study (resumed); any change → a new study."""
    base = params.train.model_dump(
        exclude={"max_epochs", "patience", "monitor", "accelerator", "resume"}
    )
    key = {
        "tune": params.tune.model_dump(exclude={"n_trials"}),
        "train": base,
        "model": params.model.model_dump(),
        "data": data_hash,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.mlflow.experiment}-{digest}"


def suggest(
    trial, tune: TuneParams, base: TrainParams, model: ModelParams
) -> tuple[TrainParams, ModelParams]:
    """This trial's train and model sections: the base ones with the sampled values on top."""
    space = tune.search_space
    values = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_size),
        "channels": trial.suggest_categorical("channels", space.channels),
        "dropout": trial.suggest_float("dropout", *space.dropout),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "optimizer": trial.suggest_categorical("optimizer", space.optimizer),
    }
    if space.model:
        values["model"] = trial.suggest_categorical("model", space.model)
    base = base.model_copy(update={"max_epochs": tune.epochs})
    return with_tuned(base, model, values, f"trial {trial.number}")


def _sampler(tune: TuneParams):
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed)
    return optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=min(5, tune.n_trials))


def _pruner(tune: TuneParams):
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=tune.epochs)
    return optuna.pruners.NopPruner()


def fail_stale_trials(study) -> int:
    """Trials left RUNNING by an interrupted earlier run are marked FAIL (not counted)."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    return len(stale)


def plot_history(study, metric: str, path: Path) -> None:
    """Each trial's value (pruned ones at their last report) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    trials = study.trials if study is not None else []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if done:
        ax.scatter([t.number for t in done], [t.value for t in done], label="complete")
        best, line = None, []
        better = min if direction(metric) == "minimize" else max
        for t in sorted(done, key=lambda t: t.number):
            best = t.value if best is None else better(best, t.value)
            line.append((t.number, best))
        ax.step(*zip(*line, strict=True), where="post", color="C3", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter([t.number for t in pruned], last, marker="x", color="grey", label="pruned")
    if not done and not pruned:
        ax.text(0.5, 0.5, "no trials (tune.n_trials: 0)", ha="center", transform=ax.transAxes)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    if direction(metric) == "minimize" and done:
        ax.set_yscale("log")
    ax.set_title(f"Optimisation history ({len(trials)} trials)")
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def tune(params: Params, out_dir: Path) -> dict:
    """Run (or resume) the study; write its reports into ``out_dir``; return best params."""
    import mlflow
    import optuna
    from mlflow.entities import Metric
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    from pipeline.training import MetricHistory, check_model, fit, load_prepared

    cfg, metric = params.tune, params.tune.metric
    data = load_prepared(splits=("train", "val"))
    for name in cfg.search_space.model or [params.model.name]:
        model = params.model.model_copy(update={"name": name})
        check_model(model, data.manifest, params.train.augment)
    data_hash = tracking.dvc_hash(PREPARED_DIR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name(params, data_hash),
        storage=STUDY_STORAGE,
        direction=direction(metric),
        sampler=_sampler(cfg),
        pruner=_pruner(cfg),
        load_if_exists=True,
    )
    stale = fail_stale_trials(study)
    finished = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    todo = max(cfg.n_trials - finished, 0)
    print(
        f"[tune] study {study.study_name}: {finished} trial(s) already done"
        + (f", {stale} interrupted trial(s) marked failed" if stale else "")
        + f"; running {todo} more ({cfg.sampler} sampler, {cfg.pruner} pruner, {metric})"
    )
    experiment_id = tracking.setup(params.mlflow.experiment)
    tags = tracking.run_tags("tune", data.manifest.source)
    client = mlflow.MlflowClient()

    def objective(trial: optuna.Trial) -> float:
        hp, model = suggest(trial, cfg, params.train, params.model)
        history = MetricHistory()
        start = time.perf_counter()
        state = "FAIL"
        with tracking.run(
            experiment_id,
            f"trial-{trial.number}",
            {**tags, "optuna.trial": str(trial.number)},
            nested=True,
        ):
            tracking.log_params(trial.params)
            try:
                pruning = PyTorchLightningPruningCallback(trial, monitor=metric)
                fit(hp, model, data, [pruning, history])
                values = [h[metric] for h in history.history if metric in h]
                if not values:
                    raise StageError(f"trial {trial.number} logged no {metric}")
                value = min(values) if direction(metric) == "minimize" else max(values)
                tracking.finite_metrics({metric: value})
                state = "COMPLETE"
                return value
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                # One call for the whole trial: each call is a round trip to the store.
                now = int(time.time() * 1000)
                epochs = [
                    Metric(k, v, now, epoch)
                    for epoch, h in enumerate(history.history)
                    for k, v in h.items()
                    if math.isfinite(v)
                ]
                if epochs:
                    client.log_batch(mlflow.active_run().info.run_id, metrics=epochs)
                mlflow.set_tag("optuna.trial_state", state)
                print(
                    f"[tune] trial {trial.number}: {state:<8} after {len(history.history)} "
                    f"epoch(s) ({time.perf_counter() - start:.1f}s)  "
                    + ", ".join(
                        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in trial.params.items()
                    ),
                    flush=True,
                )

    with tracking.run(experiment_id, "tune", {**tags, "optuna.study": study.study_name}):
        tracking.log_params({f"tune.{k}": v for k, v in cfg.model_dump().items()})
        if todo:
            study.optimize(objective, n_trials=todo, catch=(Exception,), gc_after_trial=False)
        states = [t.state for t in study.trials]
        counts = {
            s.name.lower(): states.count(s)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        mlflow.log_metrics({f"tune/trials_{k}": v for k, v in counts.items()})
        if not counts["complete"]:
            raise StageError(
                f"no trial of study {study.study_name} completed ({counts}); see the trial "
                "runs in MLflow for their errors"
            )
        best = study.best_trial
        mlflow.log_metrics(tracking.finite_metrics({f"best_{metric}": best.value}))
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
        study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
        plot_history(study, metric, out_dir / "optimization_history.png")
        write_json(out_dir / "best_params.json", best.params)
        mlflow.log_artifacts(str(out_dir), artifact_path="tune")
    print(
        f"[tune] best trial {best.number}: {metric} {best.value:.4g} with "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
        + f"; trials {counts}"
    )
    return best.params


def main() -> None:
    params = load_params()
    with atomic_dir(REPORT_DIR) as tmp:
        if params.tune.n_trials == 0:
            print("[tune] tune.n_trials is 0: training will use params.yaml as is")
            write_json(tmp / "best_params.json", {})
            (tmp / "trials.csv").write_text("")
            plot_history(None, params.tune.metric, tmp / "optimization_history.png")
        else:
            tune(params, tmp)


if __name__ == "__main__":
    run_stage("tune", main)
