"""Tune: an Optuna study over ``tune.search_space``, each trial a short Lightning training.

The study (TPE, random or grid sampler seeded from params; median, Hyperband or no pruner)
lives in ``mlruns/optuna.db``. Its name is derived from everything that makes trials
comparable (search space, metric, epochs, sampler, pruner, seed, the base train section and
the DVC hash of the prepared data, but not ``tune.n_trials``), so re-running the same study
resumes it, raising ``tune.n_trials`` extends it, and any other change starts a new one.

A resumed study does not draw its first trials' parameters again: its sampler is seeded with
``tune.seed`` plus the number of trials the study already has (see :func:`_sampler`). A trial
that was interrupted (the process killed, or ^C) is marked failed and queued once more with
its parameters. The grid sampler runs each point of the grid once (at most ``tune.n_trials``
of them); a study that has tried every point is done.

MLflow gets one parent run ``tune · <study>`` (tagged with the training device) and one
nested run per trial, ``<study> · trial <n> · <state>``, tagged with the trial's final state
and holding every epoch it trained (the one that pruned it included). A pruned trial's run
ends FINISHED; only a trial that raised ends FAILED. Writes ``reports/tune/best_params.json``
(an input of train, never written back to params.yaml), ``trials.csv``,
``optimization_history.png`` and ``intermediate_values.png`` (drawn by Optuna's matplotlib
backend). ``tune.n_trials: 0`` skips tuning: best_params.json is ``{}``, train uses
params.yaml as is, and the history plot is a placeholder.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from pipeline import tracking
from pipeline.config import (
    TUNED_FIELDS,
    ModelParams,
    Params,
    TrainParams,
    TuneParams,
    direction,
    load_params,
    provenance,
    tuned_name,
    with_tuned,
)
from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, atomic_dir, atomic_path, run_stage, write_json

REPORT_DIR = Path("reports/tune")
# User attributes of a trial: it was stopped by ^C (Optuna fails such a trial itself) / it
# runs the parameters of interrupted trial N again.
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"
# Part of a study's identity: a study whose trials name their parameters otherwise (before
# they were named by params.yaml path, e.g. "lr" for train.lr) is not resumed.
STUDY_FORMAT = 2
# The train fields a trial trains with (no early stopping, no checkpoint to resume), logged
# with the model section on every trial run.
TRIAL_TRAIN_FIELDS = (
    "seed",
    "max_epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "augment",
    "gradient_clip_val",
    "accumulate_grad_batches",
    "accelerator",
    "deterministic",
)


def searched_fields(tune: TuneParams) -> dict[str, set[str]]:
    """The train and model fields each trial samples: their params.yaml values decide nothing
    in a study, so they are not part of its identity (nor dependencies of the tune stage)."""
    fields: dict[str, set[str]] = {"train": set(), "model": set()}
    for key in tune.search_space.grid():
        section, field = TUNED_FIELDS[key]
        fields[section].add(field)
    return fields


def study_name(params: Params, data_hash: str) -> str:
    """Same inputs → same study (resumed); any change → a new study."""
    searched = searched_fields(params.tune)
    base = params.train.model_dump(
        exclude={"max_epochs", "patience", "monitor", "accelerator", "resume"} | searched["train"]
    )
    key = {
        "format": STUDY_FORMAT,
        "tune": params.tune.model_dump(exclude={"n_trials"}),
        "train": base,
        "model": params.model.model_dump(exclude=searched["model"]),
        "data": data_hash,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.mlflow.experiment}-{digest}"


def suggest(
    trial, tune: TuneParams, base: TrainParams, model: ModelParams
) -> tuple[TrainParams, ModelParams]:
    """This trial's train and model sections: the base ones with the sampled values on top.

    Each value is sampled under its params.yaml path (``train.lr``, ``model.channels``, ...).
    lr, dropout and weight_decay are floats over the min..max of their listed values: the
    [low, high] range for tpe and random, and a span that holds every grid point for grid."""
    space = tune.search_space

    def span(name: str, log: bool = False) -> float:
        values = getattr(space, name)
        return trial.suggest_float(tuned_name(name), min(values), max(values), log=log)

    def pick(name: str):
        return trial.suggest_categorical(tuned_name(name), getattr(space, name))

    values = {
        "lr": span("lr", log=True),
        "batch_size": pick("batch_size"),
        "channels": pick("channels"),
        "dropout": span("dropout"),
        "weight_decay": span("weight_decay", log=True),
        "optimizer": pick("optimizer"),
    }
    if space.model:
        values["model"] = pick("model")
    values = {tuned_name(key): value for key, value in values.items()}
    base = base.model_copy(update={"max_epochs": tune.epochs})
    return with_tuned(base, model, values, f"trial {trial.number}")


def trial_values(params: Params, hp: TrainParams, model: ModelParams, sampled: dict) -> list[dict]:
    """What a trial trains with, key by key, and where each value came from: sampled by the
    trial (``tuned``), ``tune.epochs`` for train.max_epochs, params.yaml or a default."""
    rows = provenance(
        "train",
        params.train.model_copy(update={"max_epochs": params.tune.epochs}),
        hp,
        sampled,
        fields=TRIAL_TRAIN_FIELDS,
        sources={"train.max_epochs": "tune.epochs"},
        read_tuned=False,
    )
    return rows + provenance("model", params.model, model, sampled, read_tuned=False)


def grid(tune: TuneParams) -> dict[str, list]:
    """The grid sampler's search space: each searched key, by params.yaml path, with its
    distinct listed values."""
    return {tuned_name(k): list(dict.fromkeys(v)) for k, v in tune.search_space.grid().items()}


def _sampler(tune: TuneParams, trials_so_far: int = 0):
    """The study's sampler, seeded with ``tune.seed`` plus the number of trials the study
    already has.

    A sampler's random state lives only in the process that drew: seeded as the first session
    was, a resumed study would draw the first trials' parameters again. Seeded this way, a new
    study draws as it always did, and a study resumed at the same point continues the same
    way. The grid sampler keeps ``tune.seed``: it fixes the shuffled order of the grid, which
    the points recorded in the study refer to."""
    import optuna

    if tune.sampler == "grid":
        return optuna.samplers.GridSampler(grid(tune), seed=tune.seed)
    seed = tune.seed + trials_so_far
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, tune.n_trials))


def _pruner(tune: TuneParams):
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=tune.epochs)
    return optuna.pruners.NopPruner()


def requeue_interrupted(study) -> tuple[int, list[int]]:
    """Mark the trials a killed process left RUNNING failed, and queue every interrupted
    trial (killed, or stopped by ^C) once more with its parameters.

    Returns how many trials were marked failed and the numbers of the trials queued again.
    The queued copy keeps the trial's system attributes, as Optuna's own
    ``RetryHeartbeatStaleTrialCallback`` does: the grid sampler finds there which grid point
    the trial stands for."""
    from optuna.trial import TrialState, create_trial

    trials = study.get_trials(deepcopy=False)
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    stopped = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED)]
    queued = []
    for trial in sorted(stale + stopped, key=lambda t: t.number):
        if trial.number in retried:
            continue
        study.add_trial(
            create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                system_attrs=trial.system_attrs,
                user_attrs={RETRY_OF: trial.number},
            )
        )
        queued.append(trial.number)
    return len(stale), queued


def study_storage() -> str:
    """The studies' sqlite file, ``optuna.db`` beside the project's MLflow store (the original
    repository's under a queued ``dvc exp``, see :func:`pipeline.tracking.store_dir`)."""
    mlruns = tracking.store_dir()
    mlruns.mkdir(exist_ok=True)
    return f"sqlite:///{mlruns.resolve()}/optuna.db"


def open_study(params: Params, name: str, storage: str | None = None):
    """Create or resume the study (in :func:`study_storage` unless ``storage`` says); return
    it, with its sampler ready, and how many trials to run. Prints one line saying what was
    found and what will run."""
    storage = storage or study_storage()
    import optuna
    from optuna.trial import TrialState

    cfg = params.tune
    # Failing a trial tells the study's sampler, and the grid sampler answers by stopping the
    # study, which is an error outside optimize(): this first handle's sampler draws nothing.
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=direction(cfg.metric),
        sampler=optuna.samplers.RandomSampler(),
        load_if_exists=True,
    )
    stale, queued = requeue_interrupted(study)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    todo = max(cfg.n_trials - finished, 0)
    if cfg.sampler == "grid":
        # A point is tried once a trial on it finished, failed ones included (as the grid
        # sampler counts); an interrupted one is queued again.
        space = grid(cfg)
        size = math.prod(len(values) for values in space.values())
        tried = set()
        for t in trials:
            point = {k: t.params.get(k) for k in space}
            if t.state.is_finished() and all(v in space[k] for k, v in point.items()):
                tried.add(tuple(point.values()))
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        todo = min(todo, max(size - len(tried), 0) + waiting)
        how = f"grid sampler over {size} point(s), {len(tried)} tried"
    else:
        how = f"{cfg.sampler} sampler"
    print(
        f"[tune] study {name}: {finished} trial(s) already done"
        + (f", {stale} interrupted trial(s) marked failed" if stale else "")
        + f"; running {todo} more ({how}, {cfg.pruner} pruner, {cfg.metric})"
    )
    if queued:
        print(
            "[tune] queued again with the same parameters: interrupted trial(s) "
            + ", ".join(map(str, queued))
        )
    sampler = _sampler(cfg, len(trials))
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=sampler, pruner=_pruner(cfg)
    )
    return study, todo


def optimize(study, objective, n_trials: int) -> None:
    """Run ``n_trials`` more trials (the grid sampler stops the study once every point is
    tried). A trial stopped by ^C is marked, so that the next run queues it again."""

    def marked(trial):
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            raise

    if n_trials:
        study.optimize(marked, n_trials=n_trials, catch=(Exception,), gc_after_trial=False)


def write_plots(study, metric: str, out_dir: Path) -> None:
    """``optimization_history.png``: each completed trial's value and the best so far; and,
    when trials reported epochs, ``intermediate_values.png``: each trial's curve, pruned ones
    included. Without a completed trial (``tune.n_trials: 0``) the history is a placeholder."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    trials = study.get_trials(deepcopy=False) if study is not None else []
    values = [t.value for t in trials if t.state == TrialState.COMPLETE]
    log = direction(metric) == "minimize" and all(v > 0 for v in values)
    # Optuna's plots are experimental (a warning per call) and set the ggplot style globally.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if values:
            ax = plots.plot_optimization_history(study, target_name=metric)
        else:
            _, ax = plt.subplots(figsize=(7, 4))
            ax.set(title="Optimization History Plot", xlabel="Trial", ylabel=metric)
            ax.text(0.5, 0.5, "no trials (tune.n_trials: 0)", ha="center", transform=ax.transAxes)
        figures = {"optimization_history.png": ax}
        if any(t.intermediate_values for t in trials):
            figures["intermediate_values.png"] = plots.plot_intermediate_values(study)
            figures["intermediate_values.png"].set(xlabel="epoch", ylabel=metric)
        for name, ax in figures.items():
            if log and values:
                ax.set_yscale("log")
            with atomic_path(out_dir / name) as tmp:
                ax.figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            plt.close(ax.figure)


def tune(params: Params, out_dir: Path) -> dict:
    """Run (or resume) the study; write its reports into ``out_dir``; return best params."""
    import mlflow
    import optuna
    from mlflow.entities import Metric
    from optuna.trial import TrialState
    from optuna_integration import PyTorchLightningPruningCallback

    from pipeline import device as devices
    from pipeline.training import MetricHistory, check_model, fit, load_prepared

    cfg, metric = params.tune, params.tune.metric
    data = load_prepared(splits=("train", "val"))
    for name in cfg.search_space.model or [params.model.name]:
        model = params.model.model_copy(update={"name": name})
        check_model(model, data.manifest, params.train.augment)
    device = devices.describe(devices.resolve(params.train.accelerator))
    print(f"[tune] device {device}")
    data_hash = tracking.dvc_hash(PREPARED_DIR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, todo = open_study(params, study_name(params, data_hash))
    experiment_id = tracking.setup(params.mlflow.experiment)
    tags = tracking.run_tags("tune", data.manifest.source)
    client = mlflow.MlflowClient()

    def objective(trial: optuna.Trial) -> float:
        hp, model = suggest(trial, cfg, params.train, params.model)
        history = MetricHistory()
        start = time.perf_counter()
        state = "FAIL"
        trial_tags = {**tags, "optuna.trial": str(trial.number)}
        if RETRY_OF in trial.user_attrs:
            trial_tags["optuna.retry_of"] = str(trial.user_attrs[RETRY_OF])
        # The run's name says the study, the trial and (once it ends) the trial's state.
        name = f"{study.study_name} · trial {trial.number}"
        pruned = None
        with tracking.run(experiment_id, f"{name} · RUNNING", trial_tags, nested=True) as run:
            tracking.log_values(trial_values(params, hp, model, trial.params))
            try:
                pruning = PyTorchLightningPruningCallback(trial, monitor=metric)
                # History first: it records the epoch whose value prunes the trial.
                fit(hp, model, data, [history, pruning])
                values = [h[metric] for h in history.history if metric in h]
                if not values:
                    raise StageError(f"trial {trial.number} logged no {metric}")
                value = min(values) if direction(metric) == "minimize" else max(values)
                tracking.finite_metrics({metric: value})
                state = "COMPLETE"
                return value
            except optuna.TrialPruned as exc:
                # Raised again once the run has ended: a pruned trial is not a failed run.
                state, pruned = "PRUNED", exc
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
                    client.log_batch(run.info.run_id, metrics=epochs)
                mlflow.set_tag("optuna.trial_state", state)
                client.update_run(run.info.run_id, name=f"{name} · {state}")
                print(
                    f"[tune] trial {trial.number}: {state:<8} after {len(history.history)} "
                    f"epoch(s) ({time.perf_counter() - start:.1f}s)  "
                    + ", ".join(
                        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in trial.params.items()
                    ),
                    flush=True,
                )
        raise pruned

    parent_tags = {**tags, "optuna.study": study.study_name, "device": device}
    with tracking.run(experiment_id, f"tune · {study.study_name}", parent_tags):
        settings = [f for f in TuneParams.model_fields if f != "search_space"]
        rows = provenance("tune", cfg, cfg, fields=settings)
        rows += provenance("tune.search_space", cfg.search_space, cfg.search_space)
        tracking.log_values(rows)
        optimize(study, objective, todo)
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
        # The best trial's value under the tune run's own name (a train run's best_val/loss is
        # its kept epoch's), and its parameters under the names train runs log them with.
        mlflow.log_metrics(tracking.finite_metrics({f"tune/best_{metric}": best.value}))
        tracking.log_params(best.params)
        mlflow.set_tag("optuna.best_trial", str(best.number))
        study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
        write_plots(study, metric, out_dir)
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
            write_plots(None, params.tune.metric, tmp)
        else:
            tune(params, tmp)


if __name__ == "__main__":
    run_stage("tune", main)
