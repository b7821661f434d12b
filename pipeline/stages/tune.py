"""Tune: an Optuna study over ``tune.search_space``, each trial a short Lightning training.

The study (TPE, random or grid sampler seeded from params; median, Hyperband or no pruner)
lives in ``mlruns/optuna.db``. Its name is derived from everything that makes trials
comparable (search space, metric, epochs, sampler, pruner, seed, the base train section, the
DVC hash of the prepared data and the code the trials run, but not ``tune.n_trials``), so
re-running the same study resumes it, raising ``tune.n_trials`` extends it, and any other
change starts a new one: a change to the code that DVC reruns the stage for (its ``pipeline/``
deps in dvc.yaml) runs new trials instead of resuming ones the old code ran.

A resumed study does not draw its first trials' parameters again: its sampler is seeded with
``tune.seed`` plus the number of trials the study already has (see :func:`_sampler`). A trial
that was interrupted (the process killed, or ^C) is marked failed and queued once more with
its parameters. The grid sampler runs each point of the grid once (at most ``tune.n_trials``
of them); a study that has tried every point is done.

MLflow gets one parent run ``tune · <study>`` (tagged with the training device) and one
nested run per trial, ``<study> · trial <n> · <state>``, tagged with the trial's final state
and holding every epoch it trained (the one that pruned it included; every reported check,
with ``tune.val_check_interval`` below 1: the pruner then sees a trial several times an epoch
and can stop it inside its first). A pruned trial's run ends FINISHED; only a trial that
raised ends FAILED. Writes ``reports/tune/best_params.json``
(an input of train, never written back to params.yaml), ``trials.csv``,
``optimization_history.png`` and ``intermediate_values.png`` (drawn by Optuna's matplotlib
backend). ``tune.n_trials: 0`` skips tuning: best_params.json is ``{}``, train uses
params.yaml as is, and the history plot is a placeholder.

A shared study (``tune.storage`` naming an environment variable with a database URL, e.g. the
team server's PostgreSQL, or ``tune.workers`` > 1): the stage starts ``tune.workers`` - 1
worker processes first (``python -m pipeline.stages.tune --worker I``, which wait for the
study), creates the study once and is worker 0 itself; any machine may add more (``runway
tune-worker``, i.e. ``--join``). Every worker runs trials until the study has
``tune.n_trials`` finished ones in total (:func:`run_until_done`). Trials send heartbeats: one
whose worker died is failed and run again by another worker, and the stage ends its MLflow run
KILLED (:func:`end_orphan_runs`). Trials log under the study's tune run, whose id the study
keeps (``PARENT_RUN``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import yaml

from pipeline import device as devices
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
from pipeline.io import StageError, Terminated, atomic_dir, atomic_path, run_stage, write_json

REPORT_DIR = Path("reports/tune")
# User attributes of a trial: it was stopped by ^C (and failed, see optimize) / it runs the
# parameters of interrupted trial N again.
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"
# User attributes of the study: the tune run that trials log under, and its experiment (a worker
# started elsewhere finds them there); of a trial: its MLflow run (ended KILLED when the trial's
# worker died).
PARENT_RUN = "mlflow_parent_run_id"
EXPERIMENT = "mlflow_experiment_id"
TRIAL_RUN = "mlflow_run_id"
WORKER = "worker"  # host:pid of the process that ran the trial
# Seconds between a running trial's heartbeats in a shared study (tune.storage other than local,
# or tune.workers > 1); a trial silent for GRACE_BEATS of them is failed and retried (up to
# RETRIES times) by the next worker that starts a trial. An environment variable: it changes
# no result.
HEARTBEAT_ENV = "RUNWAY_TUNE_HEARTBEAT"
HEARTBEAT_S = 10
GRACE_BEATS = 3
RETRIES = 2
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
    "lr_batch_size",
    "lr_scaling",
    "optimizer",
    "weight_decay",
    "augment",
    "gradient_clip_val",
    "accumulate_grad_batches",
    "accelerator",
    "deterministic",
    "precision",
    "compile",
    "data_placement",
)


# How the train stage spreads its training (trials run on one device): no part of a study.
PARALLEL = ("devices", "strategy", "num_nodes")
# How fast, not what, a trial trains: no part of a study either.
SPEED = ("compile", "data_placement")


def searched_fields(tune: TuneParams) -> dict[str, set[str]]:
    """The train and model fields each trial samples: their params.yaml values decide nothing
    in a study, so they are not part of its identity (nor dependencies of the tune stage)."""
    fields: dict[str, set[str]] = {"train": set(), "model": set()}
    for key in tune.search_space.grid():
        section, field = TUNED_FIELDS[key]
        fields[section].add(field)
    return fields


def code_hash(dvc_yaml: Path | None = None) -> str:
    """A digest of the code the trials run: the tune stage's ``pipeline/`` dependencies in
    ``dvc_yaml`` (a folder's ``*.py`` files; not the byte code beside them), read relative to
    the folder that holds it. By default the dvc.yaml beside this package, the code that runs
    here; with no dvc.yaml there (a package away from its project), the whole package."""
    dvc_yaml = dvc_yaml or Path(__file__).resolve().parents[2] / "dvc.yaml"
    root, deps = dvc_yaml.parent, ["pipeline/"]
    if dvc_yaml.is_file():
        deps = yaml.safe_load(dvc_yaml.read_text())["stages"]["tune"]["deps"]
    digest = hashlib.sha256()
    for dep in sorted(d for d in deps if d.startswith("pipeline/")):
        path = root / dep
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def study_name(params: Params, data_hash: str, code: str) -> str:
    """Same inputs → same study (resumed); any change → a new study. ``data_hash``: the DVC
    hash of the prepared data; ``code``: :func:`code_hash`."""
    searched = searched_fields(params.tune)
    base = params.train.model_dump(
        exclude={"max_epochs", "patience", "monitor", "accelerator", "resume", *PARALLEL, *SPEED}
        | searched["train"]
    )
    key = {
        "format": STUDY_FORMAT,
        "tune": params.tune.model_dump(exclude={"n_trials", "storage", "workers"}),
        "train": base,
        "model": params.model.model_dump(exclude=searched["model"]),
        "data": data_hash,
        "code": code,
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


def checks(tune: TuneParams) -> int:
    """The validations a trial that is not pruned reports: the pruners' steps."""
    return tune.epochs * tune.checks_per_epoch


def step_unit(tune: TuneParams) -> str:
    """What a trial's reported steps count: epochs, or checks within them."""
    return "epoch" if tune.val_check_interval == 1 else "check"


def _pruner(tune: TuneParams):
    """The study's pruner; its steps are a trial's validations (:func:`checks`): the median
    pruner prunes from the third, Hyperband's smallest budget is two."""
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=checks(tune))
    return optuna.pruners.NopPruner()


def pruning_callback(trial, monitor: str, checks_per_epoch: int = 1):
    """A Lightning callback that reports ``monitor`` to ``trial`` at its validations and
    raises ``optuna.TrialPruned`` when the pruner says so. Step ``epoch × checks_per_epoch +
    j`` is the first validation that has trained at least the (j + 1)-th part of the epoch's
    batches; a validation that reaches no new part is not reported (an epoch of fewer batches
    than twice ``checks_per_epoch`` validates after each: see
    :func:`~pipeline.training.check_schedule`). So trials of any batch size report the same
    steps for (at least) the same shares of their training. ``steps`` lists each
    validation's step, None where it was not reported.
    optuna-integration's ``PyTorchLightningPruningCallback`` reports at most once an epoch
    (its step is the epoch), which ``tune.val_check_interval`` below 1 needs more than."""
    import lightning.pytorch as pl
    import optuna

    class PruneAtChecks(pl.Callback):
        def __init__(self) -> None:
            self.steps: list[int | None] = []
            self.last = -1  # the last step reported
            self.batches = 0  # trained this epoch

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches = batch_idx + 1

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            parts = self.batches * checks_per_epoch // trainer.num_training_batches
            step = trainer.current_epoch * checks_per_epoch + parts - 1
            if step <= self.last:  # it reaches no new part of the epoch
                self.steps.append(None)
                return
            self.steps.append(step)
            self.last = step
            value = trainer.callback_metrics.get(monitor)
            if value is None:  # the objective says so once the training ends
                return
            trial.report(value.item(), step=step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"Trial was pruned at step {step}.")

    return PruneAtChecks()


def requeue_interrupted(study, running: bool = True) -> tuple[int, list[int]]:
    """Mark the trials a killed process left RUNNING failed, and queue every interrupted
    trial (killed, or stopped by ^C) once more with its parameters.

    In a shared study (``running=False``) a RUNNING trial may be another worker's: those are
    left to the heartbeat (:func:`make_storage`), and only trials stopped by ^C are queued.
    Returns how many trials were marked failed and the numbers of the trials queued again.
    The queued copy keeps the trial's system attributes, as Optuna's own
    ``RetryHeartbeatStaleTrialCallback`` does: the grid sampler finds there which grid point
    the trial stands for."""
    from optuna.trial import TrialState, create_trial

    trials = study.get_trials(deepcopy=False)
    stale = [t for t in trials if t.state == TrialState.RUNNING] if running else []
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


def shared(tune: TuneParams) -> bool:
    """Whether the study may have several workers: a database of its own (``tune.storage``)
    or ``tune.workers`` > 1."""
    return tune.storage != "local" or tune.workers > 1


def storage_url(tune: TuneParams) -> str:
    """The study database's URL: :func:`study_storage`, or the environment variable
    ``tune.storage`` names."""
    if tune.storage == "local":
        return study_storage()
    url = os.environ.get(tune.storage, "").strip()
    if not url:
        raise StageError(
            f"tune.storage: the environment variable {tune.storage} is not set: set it to the "
            "study database's URL (postgresql+psycopg://USER:PASSWORD@HOST:PORT/optuna; "
            "`runway server start` writes one to .runway/server/client.env)"
        )
    return url


def heartbeat() -> int:
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_S
    if not raw.isdigit() or int(raw) < 1:
        raise StageError(f"{HEARTBEAT_ENV}={raw!r}: expected whole seconds >= 1")
    return int(raw)


def database_error(exc) -> str:
    """The first line of what the database driver said (SQLAlchemy's ``orig``), for a
    one-line error."""
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def make_storage(tune: TuneParams, create: bool = True):
    """Optuna's RDB storage for the study. A shared study (:func:`shared`) has heartbeats: a
    trial whose worker died is failed once it has been silent for GRACE_BEATS heartbeats, and
    queued again with its parameters (``RetryHeartbeatStaleTrialCallback``). ``create=False``
    (a worker) never creates tables: the tune stage did, once."""
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    url = storage_url(tune)
    where = tune.storage if tune.storage == "local" else f"${tune.storage}"
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise StageError(f"tune.storage: {where} is not a database URL") from None
    beat = heartbeat() if shared(tune) else None
    if url.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    else:
        engine = {"pool_pre_ping": True}  # a connection the server dropped is replaced
    # Heartbeats are marked experimental in Optuna (a warning per use).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=beat,
                grace_period=beat * GRACE_BEATS if beat else None,
                heartbeat_stale_trial_callback=(
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)
                    if beat
                    else None
                ),
                skip_table_creation=not create,
            )
    except SQLAlchemyError as exc:
        raise StageError(
            f"tune.storage: cannot open the study database {shown}: {database_error(exc)}"
        ) from None


def open_study(params: Params, name: str, storage=None):
    """Create or resume the study (in :func:`study_storage` unless ``storage`` says); return
    it, with its sampler ready, and how many trials to run. Prints one line saying what was
    found and what will run."""
    storage = storage or study_storage()
    import optuna
    from optuna.exceptions import ExperimentalWarning
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
    if shared(cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    stale, queued = requeue_interrupted(study, running=not shared(cfg))
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


class Interrupted(BaseException):
    """^C in a trial that is already told failed: Optuna passes on an exception that is
    neither an ``Exception`` nor ``KeyboardInterrupt`` without logging it (for
    ``KeyboardInterrupt`` it logs the trial's failure with a traceback, under the stage's
    one line)."""


def optimize(study, objective, n_trials: int, callbacks=None) -> None:
    """Run ``n_trials`` more trials (the grid sampler stops the study once every point is
    tried). A trial stopped by ^C or SIGTERM is marked, so that the next run queues it again;
    one stopped by ^C is failed, as Optuna fails it, and ``KeyboardInterrupt`` raised again."""
    from optuna.trial import TrialState

    def marked(trial):
        try:
            return objective(trial)
        except Terminated:
            trial.set_user_attr(INTERRUPTED, True)
            raise
        except KeyboardInterrupt:
            # A second ^C here would leave the trial half told (and Optuna would log it).
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                trial.set_user_attr(INTERRUPTED, True)
                study.tell(trial, state=TrialState.FAIL)
            finally:
                signal.signal(signal.SIGINT, previous)
            raise Interrupted from None

    if n_trials:
        try:
            study.optimize(
                marked,
                n_trials=n_trials,
                catch=(Exception,),
                gc_after_trial=False,
                callbacks=callbacks,
            )
        except Interrupted:
            raise KeyboardInterrupt from None


def write_plots(study, metric: str, out_dir: Path, unit: str = "epoch") -> None:
    """``optimization_history.png``: each completed trial's value and the best so far; and,
    when trials reported epochs (or checks within them: ``unit``),
    ``intermediate_values.png``: each trial's curve, pruned ones included. Without a
    completed trial (``tune.n_trials: 0``) the history is a placeholder."""
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
            figures["intermediate_values.png"].set(xlabel=unit, ylabel=metric)
        for name, ax in figures.items():
            if log and values:
                ax.set_yscale("log")
            with atomic_path(out_dir / name) as tmp:
                ax.figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            plt.close(ax.figure)


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_objective(params: Params, study, data, experiment_id: str, tags: dict, label: str):
    """A trial: one short Lightning training with the sampled values, logged as a nested
    MLflow run under the study's tune run (``PARENT_RUN``, which a worker in another process
    reads from the study), named ``<study> · trial <n> · <state>``."""
    import mlflow
    import optuna
    from mlflow.entities import Metric
    from optuna.exceptions import ExperimentalWarning

    from pipeline.training import MetricHistory, fit

    cfg, metric = params.tune, params.tune.metric
    unit = step_unit(cfg)
    client = mlflow.MlflowClient()
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        hp, model = suggest(trial, cfg, params.train, params.model)
        history = MetricHistory()
        start = time.perf_counter()
        state = "FAIL"
        trial_tags = {**tags, "optuna.trial": str(trial.number)}
        retry_of = trial.user_attrs.get(RETRY_OF)
        if retry_of is None and shared(cfg):  # queued again by the heartbeat: its worker died
            frozen = study.get_trials(deepcopy=False)[trial.number]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry_of = optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)
        if retry_of is not None:
            trial_tags["optuna.retry_of"] = str(retry_of)
        # The run's name says the study, the trial and (once it ends) the trial's state.
        name = f"{study.study_name} · trial {trial.number}"
        parent = study.user_attrs.get(PARENT_RUN)
        pruned = None
        pruning = pruning_callback(trial, metric, cfg.checks_per_epoch)
        with tracking.run(
            experiment_id, f"{name} · RUNNING", trial_tags, nested=True, parent_run_id=parent
        ) as run:
            trial.set_user_attr(TRIAL_RUN, run.info.run_id)
            trial.set_user_attr(WORKER, worker)
            tracking.log_values(trial_values(params, hp, model, trial.params))
            try:
                # History first: it records the check whose value prunes the trial.
                fit(hp, model, data, [history, pruning], checks_per_epoch=cfg.checks_per_epoch)
                value = trial_value(metric, pruning.steps, history.history)
                if value is None:
                    raise StageError(f"trial {trial.number} logged no {metric}")
                tracking.finite_metrics({metric: value})
                state = "COMPLETE"
                return value
            except optuna.TrialPruned as exc:
                # Raised again once the run has ended: a pruned trial is not a failed run.
                state, pruned = "PRUNED", exc
            finally:
                # One call for the whole trial: each call is a round trip to the store.
                # Step: the epoch, or the check (tune.val_check_interval below 1), as the
                # pruner counts.
                now = int(time.time() * 1000)
                steps = [
                    Metric(k, v, now, step)
                    # Not strict: this runs as an error leaves too, which it must not hide.
                    for step, h in zip(pruning.steps, history.history, strict=False)
                    if step is not None
                    for k, v in h.items()
                    if math.isfinite(v)
                ]
                if steps:
                    client.log_batch(run.info.run_id, metrics=steps)
                client.set_tag(run.info.run_id, "optuna.trial_state", state)
                client.update_run(run.info.run_id, name=f"{name} · {state}")
                print(
                    f"{label} trial {trial.number}: {state:<8} "
                    f"after {sum(s is not None for s in pruning.steps)} "
                    f"{unit}(s) ({time.perf_counter() - start:.1f}s)  "
                    + ", ".join(
                        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in trial.params.items()
                    ),
                    flush=True,
                )
        raise pruned

    return objective


def trial_value(metric: str, steps: list, history: list[dict]) -> float | None:
    """A trial's value: the best ``metric`` of its reported checks (``steps`` not None, see
    :func:`pruning_callback`; ``history``, the metrics of each validation), one its run logged
    and its pruner saw; None if none has it."""
    values = [
        h[metric]
        for step, h in zip(steps, history, strict=True)
        if step is not None and metric in h
    ]
    if not values:
        return None
    return min(values) if direction(metric) == "minimize" else max(values)


def counts(study) -> dict[str, int]:
    """The study's trials by state (lower-case names)."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {s.name.lower(): states.count(s) for s in TrialState}


class TrialLock:
    """One lock for every worker of a shared study, wherever it runs, held from counting the
    study's trials to the creation of the next one: two workers whose trials end together can
    otherwise both count ``n_trials`` - 1 and each start one more (Optuna's
    ``MaxTrialsCallback`` counts, and the next trial is created after it, by another
    statement). PostgreSQL: a session advisory lock keyed by the study's name, on a connection
    with TCP keepalives, so that the server ends the session (and the lock) of a worker that
    died or lost its network within about 25 s; SQLite: a file lock beside the database file,
    let go by the OS when its process dies. Other databases have none: the study may end with
    a few trials more than ``n_trials`` (said once, here)."""

    # The server probes a silent client after 10 s, every 5 s, and gives up after 3 probes; the
    # worker does the same with the server.
    KEEPALIVES = {"idle": 10, "interval": 5, "count": 3}

    def __init__(self, url: str, name: str, label: str = "[tune]"):
        from sqlalchemy.engine import make_url

        found = make_url(url)
        self.backend = found.get_backend_name()
        self.shown = found.render_as_string(hide_password=True)
        self.held = False
        self.file = self.engine = self.connection = None
        if self.backend == "sqlite":
            from filelock import FileLock

            self.file = FileLock(f"{found.database}.lock")
        elif self.backend == "postgresql":
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            server = " ".join(f"-c tcp_keepalives_{k}={v}" for k, v in self.KEEPALIVES.items())
            client = {f"keepalives_{k}": v for k, v in self.KEEPALIVES.items()}
            # A connection of its own, really closed on release: a pooled one would keep the
            # lock if unlocking failed.
            self.engine = create_engine(
                url,
                poolclass=NullPool,
                connect_args={"keepalives": 1, **client, "options": server},
            )
            digest = hashlib.sha256(f"runway study {name}".encode()).digest()
            self.key = int.from_bytes(digest[:8], "big", signed=True)
        else:
            print(
                f"{label} the study database ({self.backend}) has no lock the workers share: "
                "the study may end with a trial or two more than tune.n_trials",
                flush=True,
            )

    def acquire(self) -> None:
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        if self.held:
            return
        if self.file is not None:
            self.file.acquire()
        elif self.engine is not None:
            try:
                connection = self.engine.connect()
            except SQLAlchemyError as exc:
                raise StageError(
                    f"tune.storage: cannot lock the study database {self.shown}: "
                    + database_error(exc)
                ) from None
            try:
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            except BaseException:
                # SQLAlchemy has already ended the session of a wait that SIGTERM or ^C
                # interrupted (it invalidates the connection), so it cannot take the lock later.
                connection.close()
                raise
            self.connection = connection
        self.held = True

    def release(self) -> None:
        from sqlalchemy import text

        if not self.held:
            return
        self.held = False
        if self.file is not None:
            self.file.release()
        elif self.connection is not None:
            try:
                self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            finally:
                self.connection.close()  # a session lock ends with its connection anyway
                self.connection = None

    def close(self) -> None:
        self.release()
        if self.engine is not None:
            self.engine.dispose()

    def __enter__(self) -> TrialLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_until_done(study, objective, n_trials: int, lock: TrialLock) -> None:
    """A worker of a shared study: run trials until the study has ``n_trials`` finished ones
    (complete or pruned) in total, counting every worker's, wherever it runs.

    Optuna's ``MaxTrialsCallback`` stops this worker once the finished and running trials
    reach ``n_trials``; the worker then waits while other workers' last trials run, failing
    stale ones (a worker that died) so that their retries, queued by the heartbeat, run here.
    Each count is made under ``lock``, held until the trial it lets start exists, so the
    study never gets more than ``n_trials``. A worker runs at most ``n_trials`` trials
    itself: a study whose trials all fail ends."""
    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    enough = MaxTrialsCallback(
        n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    )

    def counted(study, trial) -> None:  # after each trial; the next one, if any, releases
        lock.acquire()
        enough(study, trial)

    def started(trial):
        lock.release()
        return objective(trial)

    ran = 0
    while ran < n_trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        lock.acquire()
        try:
            now = counts(study)
            done = now["complete"] + now["pruned"]
            if done >= n_trials:
                return
            if now["waiting"] or done + now["running"] < n_trials:
                before = len(study.get_trials(deepcopy=False))
                optimize(study, started, n_trials - ran, callbacks=[counted])
                new = len(study.get_trials(deepcopy=False)) - before
                if new == 0:  # the grid sampler stopped the study: every point is tried
                    return
                ran += new
                continue
        finally:
            lock.release()
        if not now["running"]:
            return
        time.sleep(0.5)


def end_orphan_runs(study) -> int:
    """End the MLflow runs of trials whose worker died (a failed trial whose run still says
    RUNNING) as KILLED. Returns how many."""
    import mlflow
    from optuna.trial import TrialState

    client = mlflow.MlflowClient()
    ended = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(TRIAL_RUN)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "optuna.trial_state", "FAIL")
            client.update_run(
                run_id, status="KILLED", name=f"{study.study_name} · trial {trial.number} · FAIL"
            )
            client.set_terminated(run_id, "KILLED")
            ended += 1
    return ended


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


GO = "go\n"  # what the tune stage writes to its workers once the study database is made
# Seconds a stage stopped by ^C gives its workers, which the same ^C reached, to end their
# trials themselves (failed and marked interrupted) before it stops them with SIGTERM.
INTERRUPT_GRACE = 10


def worker_command(worker: int, threads: int) -> list[str]:
    """The command line of the stage's worker ``worker`` (1 and up)."""
    command = [sys.executable, "-m", "pipeline.stages.tune", "--threads", str(threads)]
    return [*command, "--worker", str(worker)]


@contextmanager
def more_workers(workers: int):
    """Start workers 1 .. ``workers`` - 1 as processes (``python -m pipeline.stages.tune
    --worker I``) with the cores shared between all; the stage's own process is worker 0.
    Yields ``go``: each worker imports and loads the data at once, then waits for ``go()``,
    which the stage calls once the study database is made (Optuna writes its schema version
    rows wherever it finds them missing, so a worker opening a database the stage is still
    making would write them too, and one of the two writes would fail). On leaving, wait for
    them; a worker that died is reported (its trial is failed by its heartbeat and retried by
    the others). SIGTERM or ^C here, or while waiting for their last trials, stops them all
    (after ^C, which a terminal sends to every worker too, each gets :data:`INTERRUPT_GRACE`
    seconds to stop itself); workers that were
    never told to go have opened nothing and are killed without a word. A worker stopped with
    its stage ends without a line of its own: the stage says why."""
    threads = threads_per_worker(workers)
    procs = [
        subprocess.Popen(worker_command(i, threads), stdin=subprocess.PIPE, text=True)
        for i in range(1, workers)
    ]

    def go() -> None:
        print(
            f"[tune] {workers} workers (this process and {workers - 1} more), {threads} torch "
            "thread(s) each",
            flush=True,
        )
        for proc in procs:
            try:
                proc.stdin.write(GO)
                proc.stdin.close()
            except BrokenPipeError:  # it died already (closed all the same): reported on leaving
                pass

    def stop(interrupted: bool) -> None:
        told = [proc for proc in procs if proc.stdin.closed]
        for proc in procs:
            if proc not in told:
                proc.stdin.close()  # nothing was written: EOF, as if the stage had died
                proc.kill()
        try:
            if interrupted:  # ^C at a terminal reaches every worker: each ends its own trial
                deadline = time.monotonic() + INTERRUPT_GRACE
                for proc in told:
                    with suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:  # a second ^C in the grace cuts it short: SIGTERM all the same
            for proc in told:
                if proc.poll() is None:
                    proc.terminate()

    def ended(proc: subprocess.Popen, wait: float | None) -> int:
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    done = False
    try:
        yield go
        done = True
    except BaseException as stopped:
        stop(interrupted=isinstance(stopped, KeyboardInterrupt))
        raise
    finally:
        try:
            codes = [ended(proc, None if done else 30) for proc in procs]
        except BaseException as stopped:  # stopped while the workers' last trials run
            try:
                stop(interrupted=isinstance(stopped, KeyboardInterrupt))
            finally:
                for proc in procs:
                    ended(proc, 30)
            raise
    for i, code in enumerate(codes, start=1):
        if code:
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            print(
                f"[tune] worker {i} ended with {why}; a trial it left running is failed "
                "by its heartbeat and retried",
                file=sys.stderr,
                flush=True,
            )


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` for the block (None: as they are)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(params: Params):
    """The train and val splits, checked against every model the study may build, cut to
    ``tune.train_samples`` and ``tune.val_samples`` (see :func:`subset`). Their tables keep
    the ids and labels only: the trials take the features as tensors. A cut split's inputs
    are a copy of the samples kept: in memory, or for splits memory-mapped from disk in a
    memory-mapped file beside the split's copy, whatever its size, made by the first worker
    and shared by the others (:func:`~pipeline.data.mapped.shared_take`); a split not cut
    has no such file left.
    """
    import torch

    from pipeline.data.loader import Prepared, load_prepared
    from pipeline.data.mapped import drop_cuts, shared_take
    from pipeline.data.table import features_of
    from pipeline.training import check_model

    data = load_prepared(
        splits=("train", "val"),
        placement=params.train.data_placement,
        processes=params.tune.workers,  # all load at once
    )
    for name in params.tune.search_space.model or [params.model.name]:
        model = params.model.model_copy(update={"name": name})
        check_model(model, data.manifest, params.train.augment)
    cfg = params.tune
    tables = {split: t.drop(columns=features_of(t)) for split, t in data.tables.items()}
    tensors, copies = dict(data.tensors), dict(data.copies)
    for split, most, role, key in (
        ("train", cfg.train_samples, "train on", "train_samples"),
        ("val", cfg.val_samples, "are judged on", "val_samples"),
    ):
        keep = subset(len(tables[split]), most, cfg.seed)
        if keep is None:
            if data.storage == "disk":
                drop_cuts(data.copies[split], split)  # an earlier run's, no longer used
            continue
        x, y = tensors[split]
        print(
            f"[tune] trials {role} {len(keep)} of the {len(x)} {split} samples "
            f"(tune.{key}); the train stage uses them all"
        )
        tables[split] = tables[split].iloc[keep.numpy()].reset_index(drop=True)
        if data.storage == "disk":
            mapped = x.numpy().reshape(len(x), -1)  # the copy as mapped: its file may go
            taken = shared_take(data.copies[split], split, keep.numpy(), mapped)
            copies[split] = Path(taken.filename)
            tensors[split] = (torch.from_numpy(taken.reshape(-1, *x.shape[1:])), y[keep])
        else:
            tensors[split] = (x[keep], y[keep])
    return Prepared(data.manifest, tables, tensors, data.storage, data.storage_reason, copies)


def subset(n: int, most: int | None, seed: int):
    """Sorted indices of ``most`` of ``n`` samples drawn with ``seed`` (the same in every
    worker), or None when all are kept."""
    import torch

    if most is None or n <= most:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:most].sort().values


def tune(params: Params, out_dir: Path) -> dict:
    """Run (or resume) the study; write its reports into ``out_dir``; return best params."""
    cfg = params.tune
    # Local workers start first, so that their imports and data loading (about 5 s) overlap
    # this process's instead of following them while this process already runs trials.
    # They open the study database only when told to go, once it is made (see
    # more_workers), and then wait for the study this process is about to open.
    workers = ExitStack()
    go = workers.enter_context(more_workers(cfg.workers)) if cfg.workers > 1 else None
    with workers:
        devices.available(params.train.accelerator)  # a device this machine lacks: one line
        quiet_optuna()
        storage = make_storage(cfg)
        if go is not None:
            go()
        return run_study(params, out_dir, workers, storage)


def run_study(params: Params, out_dir: Path, workers: ExitStack, storage) -> dict:
    """:func:`tune` once the study database (Optuna's ``storage``) is made and the local
    workers (``workers``) are started: closing ``workers`` waits for them."""
    import mlflow
    from optuna.trial import TrialState

    cfg, metric = params.tune, params.tune.metric
    data = prepare(params)
    device = devices.describe(devices.resolve(params.train.accelerator))
    print(f"[tune] device {device}")
    data_hash = tracking.dvc_hash(PREPARED_DIR)
    study, todo = open_study(params, study_name(params, data_hash, code_hash()), storage)
    experiment_id = tracking.setup(params.mlflow.experiment)
    tags = tracking.run_tags("tune", data.manifest.source)

    parent_tags = {**tags, "optuna.study": study.study_name, "device": device}
    with tracking.run(experiment_id, f"tune · {study.study_name}", parent_tags) as parent:
        study.set_user_attr(PARENT_RUN, parent.info.run_id)
        study.set_user_attr(EXPERIMENT, experiment_id)
        settings = [f for f in TuneParams.model_fields if f != "search_space"]
        rows = provenance("tune", cfg, cfg, fields=settings)
        rows += provenance("tune.search_space", cfg.search_space, cfg.search_space)
        tracking.log_values(rows)
        label = "[tune worker 0]" if cfg.workers > 1 else "[tune]"
        objective = make_objective(params, study, data, experiment_id, tags, label)
        if not shared(cfg):
            optimize(study, objective, todo)
        else:
            many = cfg.workers > 1 and todo
            threads = threads_per_worker(cfg.workers) if cfg.workers > 1 else None
            with TrialLock(storage_url(cfg), study.study_name, label) as lock:
                with torch_threads(threads):
                    # Until the total is reached, counting every worker's trials (and those of
                    # workers on other machines), a dead worker's retried trial included.
                    run_until_done(study, objective, cfg.n_trials, lock)
                workers.close()  # waits for the local workers
                if many:  # a trial of a worker that died after the others finished
                    run_until_done(study, objective, cfg.n_trials, lock)
            ended = end_orphan_runs(study)
            if ended:
                print(f"[tune] {ended} trial run(s) of a worker that died ended as KILLED")
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
        write_plots(study, metric, out_dir, step_unit(cfg))
        write_json(out_dir / "best_params.json", best.params)
        mlflow.log_artifacts(str(out_dir), artifact_path="tune")
    print(
        f"[tune] best trial {best.number}: {metric} {best.value:.4g} with "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
        + f"; trials {counts}"
    )
    return best.params


def opened_study(name: str, storage):
    """The study ``name`` once the tune stage has opened it (its MLflow run is set); else None."""
    import optuna

    try:
        found = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    return found if PARENT_RUN in found.user_attrs else None


def wait_for_study(cfg: TuneParams, name: str, stage: int | None = None):
    """(storage, study) for a worker the tune stage started: the stage made the database
    before telling it to go, but such a worker is usually ready before the stage has opened
    the study, so it waits while the stage (process ``stage``, default: the parent) runs. The
    study is None if the stage ended first."""
    from optuna.exceptions import OptunaError
    from sqlalchemy.exc import SQLAlchemyError

    stage, storage = stage or os.getppid(), None
    while True:
        try:
            storage = storage or make_storage(cfg, create=False)
            found = opened_study(name, storage)
        # The database not reachable for a moment (a busy SQLite file, a server restarting),
        # or not made (Optuna's StorageInternalError, or RuntimeError from its schema version
        # check): the storage is made again on the next try.
        except (StageError, SQLAlchemyError, OptunaError, RuntimeError):
            if os.getppid() != stage:
                raise
            storage, found = None, None
        if found is not None or os.getppid() != stage:
            return storage, found
        time.sleep(0.2)


def join(
    params: Params, index: int | None = None, threads: int | None = None, stage: int | None = None
) -> None:
    """Work on the current study (the one the tune stage runs for these params and this
    prepared data) until it has ``tune.n_trials`` finished trials: a worker started by the
    tune stage (``index``; ``stage``: that stage's process, default the parent) or by
    ``runway tune-worker`` on any machine that reaches the study database and has the same
    params and data (``dvc pull``)."""
    import optuna

    cfg = params.tune
    label = "[tune worker]" if index is None else f"[tune worker {index}]"
    if cfg.n_trials == 0:
        print(f"{label} tune.n_trials is 0: nothing to do")
        return
    if index is None:  # the tune stage checks the device for the workers it starts
        devices.available(params.train.accelerator)  # a device this machine lacks: one line

    def terminated(signum, frame):  # the trial ends failed, its run KILLED, and is retried
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
    if threads:
        import torch

        torch.set_num_threads(threads)
    data = prepare(params)
    name = study_name(params, tracking.dvc_hash(PREPARED_DIR), code_hash())
    quiet_optuna()
    if index is None:
        storage = make_storage(cfg, create=False)
        found = opened_study(name, storage)
    else:
        # MLflow's import (about 0.5 s), while the stage still makes the study: it is ready
        # for its first trial as soon as the stage is.
        import mlflow  # noqa: F401

        if sys.stdin.readline() != GO:  # the stage ended before it made the study database
            return
        storage, found = wait_for_study(cfg, name, stage)
        if found is None:  # the stage ended before it opened the study, and says why
            return
    if found is None:
        raise StageError(
            f"study {name} is not in the study database yet: the tune stage starts it "
            "(`dvc repro` on one machine, with the same code, params.yaml and data), then "
            "workers join"
        )
    # Each worker draws from its own random stream: workers started together would else
    # sample the same first trials.
    offset = len(found.get_trials(deepcopy=False)) + (
        index + 1 if index is not None else os.getpid()
    )
    study = optuna.load_study(
        study_name=name, storage=storage, sampler=_sampler(cfg, offset), pruner=_pruner(cfg)
    )
    tracking.setup(params.mlflow.experiment)
    experiment_id = study.user_attrs[EXPERIMENT]
    tags = tracking.run_tags("tune", data.manifest.source)
    objective = make_objective(params, study, data, experiment_id, tags, label)
    print(f"{label} joined study {name}: {counts(study)['complete']} trial(s) complete", flush=True)
    with TrialLock(storage_url(cfg), name, label) as lock:
        run_until_done(study, objective, cfg.n_trials, lock)
    done = counts(study)
    print(f"{label} done: the study has {done['complete'] + done['pruned']} finished trial(s)")


def main(argv: list[str] | None = None) -> None:
    """The stage (no arguments), or a worker of its study (``--worker I`` / ``--join``);
    ``argv``: the arguments (None: the command line's)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.tune")
    parser.add_argument(
        "--worker",
        type=int,
        help="run as local worker I of the tune stage (it starts these, and writes go to "
        "their standard input once the study database is made)",
    )
    parser.add_argument("--join", action="store_true", help="run as a worker (runway tune-worker)")
    parser.add_argument("--threads", type=int, help="torch threads of a worker")
    args = parser.parse_args(argv)
    stage = os.getppid()  # a worker's stage, taken before it can end (it says go seconds later)
    params = load_params()
    if args.worker is not None:
        try:
            join(params, args.worker, args.threads, stage)
        except KeyboardInterrupt:  # its stage, stopped too, says so once
            sys.exit(130)
        except Terminated:  # stopped by its stage, or with it
            sys.exit(143)
        return
    if args.join:
        join(params, None, args.threads)
        return
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
