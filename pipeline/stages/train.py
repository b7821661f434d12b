"""Train: the final model, with params.yaml's ``train`` section merged with the tuned values.

Seeded (bit-identical on the CPU; ``train.deterministic`` says how strict on a GPU); early
stopping, the kept (best) weights and resuming use Lightning's EarlyStopping,
ModelCheckpoint and OnExceptionCheckpoint. Per-epoch metrics go to MLflow through
Lightning's MLFlowLogger (step = epoch, tracking URI passed explicitly), and the network is
logged as an MLflow model with a signature and an input example. The run is tagged with the
device and the determinism it got. Writes ``models/``: ``model.pt`` (the weights of the best
epoch by ``train.monitor``), ``model.json`` (what it takes to rebuild it) and ``run.json``
(MLflow run id and model URI).

Interrupted training resumes. The checkpoints live in ``.runway/train/`` (outside
``models/``, which DVC clears before each run): ``last.ckpt`` written at every epoch end and
on SIGTERM or ^C (at the next step end, see ``pipeline.training.SignalsAtStepEnd``), and
``best.ckpt``. After an interruption the stage ends the MLflow run KILLED and exits 143 (130
for ^C). The next run with the same params and data continues the same MLflow run from
``last.ckpt``, where the interrupted one stopped (``train.resume: auto``); ``must`` makes a
missing checkpoint an error, ``never`` starts afresh. Checkpoints are loaded weights-only.
After a SIGKILL the next run resumes from the last epoch end; either way it ends with the
same weights and metrics as a run never stopped. One run at a time: a second one while
another holds ``.runway/train.lock`` stops at once, naming the process that holds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.distributed import ReduceOp

from pipeline import tracking
from pipeline.config import (
    RANGES,
    TUNABLE,
    ModelParams,
    Params,
    TrainParams,
    direction,
    load_params,
    provenance,
    with_tuned,
)
from pipeline.data.loader import Prepared, load_prepared
from pipeline.data.profile import PROFILE_ARTIFACT, profile
from pipeline.data.table import PREPARED_DIR
from pipeline.device import available, describe, resolve
from pipeline.io import (
    StageError,
    Terminated,
    atomic_dir,
    env_scope,
    exclusive,
    load_error,
    read_json,
    run_stage,
    write_json,
)
from pipeline.models import MODELS_DIR, class_names, model_spec
from pipeline.training import Checkpoint, EpochLine, Stopping, fit, nondeterministic_ops

BEST_PARAMS = Path("reports/tune/best_params.json")
# Data-parallel training: the checkpoint every process starts from (the first process decides
# and puts it in the environment the others are started with).
CKPT_ENV = "RUNWAY_TRAIN_CKPT"
# MLflow's setting of the device its pyfunc loader puts a PyTorch model on.
PREDICTION_DEVICE = "MLFLOW_DEFAULT_PREDICTION_DEVICE"
RESUME_DIR = Path(".runway/train")
LOCK = Path(".runway/train.lock")  # beside RESUME_DIR, which is deleted and made again
# Part of the resume key: a checkpoint written by an older layout is never resumed.
CHECKPOINT_FORMAT = 4
# The train fields a run logs: all but train.resume, which says how to continue, not what to train.
TRAIN_FIELDS = tuple(f for f in TrainParams.model_fields if f != "resume")


class Resume:
    """The checkpoints of a training run that may be interrupted, and whether to resume one.

    ``key`` identifies what is being trained (params and data); a checkpoint left by a run
    with another key is never resumed."""

    def __init__(self, key: str, directory: Path = RESUME_DIR) -> None:
        self.key, self.dir = key, directory
        self.last, self.best, self.state = (
            directory / "last.ckpt",
            directory / "best.ckpt",
            directory / "state.json",
        )

    def find(self, mode: str) -> tuple[Path | None, str | None]:
        """(checkpoint, MLflow run id) to continue, or (None, None) to start afresh."""
        state = read_json(self.state) if self.state.is_file() else None
        same = state is not None and state.get("key") == self.key
        usable = same and self.last.is_file()
        if not usable:
            why = (
                "does not exist"
                if not self.last.is_file()
                else "is from a run with other params or data"
            )
        if mode == "never" or (not usable and mode == "auto"):
            if state is not None and mode == "auto":
                print(f"[train] not resuming: {self.last} {why}; starting afresh")
            shutil.rmtree(self.dir, ignore_errors=True)
            return None, None
        if not usable:
            raise StageError(
                f"train.resume is 'must' but {self.last} {why}; set train.resume: auto to "
                "start afresh"
            )
        try:
            checkpoint = torch.load(self.last, map_location="cpu", weights_only=True)
            epoch, step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        except Exception as exc:  # truncated, corrupt, or a pickle payload
            raise StageError(
                f"{self.last}: cannot resume from this checkpoint ({load_error(exc)}); "
                "delete it or set train.resume: never"
            ) from None
        print(
            f"[train] resuming the interrupted run from {self.last} (saved in epoch "
            f"{epoch + 1}, after {step} optimizer steps)"
        )
        return self.last, state["run_id"]

    def started(self, run_id: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.state, {"key": self.key, "run_id": run_id})

    def finished(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Lightning's OnExceptionCheckpoint for SIGTERM and ^C only (a run that failed is not
    resumed), saying where the checkpoint went. It keeps the file when training ends: the
    stage removes the directory once the model is saved and logged."""

    INTERRUPTIONS = (Terminated, KeyboardInterrupt, SIGTERMException)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, self.INTERRUPTIONS):
            return
        super().on_exception(trainer, pl_module, exception)
        print(
            f"[train] interrupted in epoch {trainer.current_epoch + 1} after "
            f"{trainer.global_step} optimizer steps: checkpoint saved to {self.ckpt_path}; "
            "run the stage again to resume",
            flush=True,
        )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        pass


class StayStopped(pl.Callback):
    """Early stopping ends training at an epoch end, after that epoch's checkpoint is written.
    A run resumed from that checkpoint (the process was killed before it saved the model)
    stops there too instead of training one more epoch: EarlyStopping's state, restored from
    the checkpoint, says it stopped; the Trainer's own stop flag is not in a checkpoint."""

    def on_train_start(self, trainer, pl_module) -> None:
        if any(callback.stopped_epoch for callback in trainer.early_stopping_callbacks):
            trainer.should_stop = True


class LoggedEpochs(pl.Callback):
    """Every epoch's logged metrics, kept in every checkpoint (a callback's state). The train
    stage's MLflow logger sends them asynchronously, so a process killed just after a
    checkpoint may take its last epochs' metrics with it; a run resumed from that checkpoint
    sends MLflow, at the steps they had, the ones its history lacks."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.epochs.append({k: v.item() for k, v in metrics.items() if k != "step"})

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict["epochs"])

    def on_train_start(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if not self.epochs or not isinstance(logger, MLFlowLogger) or not trainer.is_global_zero:
            return
        from mlflow.entities import Metric

        client, run_id, now = logger.experiment, logger.run_id, int(time.time() * 1000)
        missing = []
        for key in sorted({k for epoch in self.epochs for k in epoch}):
            logged = {m.step for m in client.get_metric_history(run_id, key)}
            missing += [
                Metric(key, epoch[key], now, step)
                for step, epoch in enumerate(self.epochs)
                if key in epoch and step not in logged
            ]
        if missing:
            client.log_batch(run_id, metrics=missing)


class CheckpointedLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, sending an epoch's metrics once that epoch's ``last.ckpt`` is
    written (after the ModelCheckpoint without a monitor saves), and whatever is still held
    when the fit ends, fails or is interrupted. Lightning hands the logger an epoch's metrics
    before its checkpoints are written; a process killed in between would resume from the
    previous epoch's checkpoint and train that epoch again, and MLflow would hold two points
    at its step. Sent only after the checkpoint, they are either in MLflow and in the
    checkpoint, or (killed before they reached the store) sent again from the checkpoint by
    :class:`LoggedEpochs`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[tuple[dict, int | None]] = []

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        self.held.append((dict(metrics), step))

    def send(self) -> None:
        held, self.held = self.held, []
        for metrics, step in held:
            super().log_metrics(metrics, step)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if checkpoint_callback.monitor is None:  # last.ckpt, written every epoch end
            self.send()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.send()
        super().finalize(status)


class ReplicasInSync(pl.Callback):
    """Data-parallel training: at the end, every process's weights are compared with the
    first process's (a sha256 of the parameters, gathered from all processes). Replicas that
    drifted apart would make the kept model depend on which process saved it."""

    def __init__(self) -> None:
        self.identical: bool | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        digest = hashlib.sha256()
        for tensor in pl_module.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        mine = int.from_bytes(digest.digest()[:7], "big")
        low, high = (
            trainer.strategy.reduce(
                torch.tensor([mine], dtype=torch.int64, device=pl_module.device), reduce_op=op
            ).item()
            for op in (ReduceOp.MIN, ReduceOp.MAX)
        )
        self.identical = low == high == mine
        if not self.identical:
            raise StageError(
                f"the {trainer.world_size} training processes ended with different weights"
            )


def replica() -> bool:
    """Whether this process is one of the other processes of a data-parallel training
    (Lightning starts them with LOCAL_RANK set; other machines' with NODE_RANK)."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("LOCAL_RANK", "NODE_RANK"))


def lost_process(exc: BaseException) -> str | None:
    """One line for a data-parallel training whose other process died (its connection gone,
    torch's error names the peer); None for any other error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\] ", "", first)  # the source file and line of the message
    first = re.split(r"\. This is typically", first)[0]
    return (
        f"another process of the data-parallel training ({dist.get_world_size()} processes) "
        f"stopped: {first}; nothing was kept"
    )


def global_batch(hp: TrainParams, trainer: pl.Trainer) -> int:
    return hp.batch_size * trainer.world_size * hp.accumulate_grad_batches


def resume_key(hp: TrainParams, model: ModelParams) -> str:
    what = {
        "format": CHECKPOINT_FORMAT,
        "train": hp.model_dump(exclude={"resume", "accelerator", "data_placement"}),
        "model": model.model_dump(),
        "data": tracking.dvc_hash(PREPARED_DIR) if PREPARED_DIR.exists() else None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def merged_params(
    params: Params, best_params_path: Path = BEST_PARAMS
) -> tuple[TrainParams, ModelParams]:
    """The train and model sections with the tuned values on top."""
    best = read_json(best_params_path) if best_params_path.exists() else {}
    return with_tuned(params.train, params.model, best, str(best_params_path))


def train_callbacks(hp: TrainParams, resume: Resume) -> tuple[list[pl.Callback], ModelCheckpoint]:
    """What the train stage trains with: early stopping, the best epoch's weights by
    ``train.monitor`` (``best.ckpt``), the state to resume from at every epoch end and on
    SIGTERM or ^C (``last.ckpt``), and one line per epoch. Returns the callbacks and the
    ModelCheckpoint that knows the best epoch."""
    mode = "max" if direction(hp.monitor) == "maximize" else "min"
    best = Checkpoint(
        dirpath=resume.dir,
        filename=resume.best.stem,
        monitor=hp.monitor,
        mode=mode,
        save_top_k=1,
        save_weights_only=True,  # the model is all it is for
        enable_version_counter=False,
    )
    # Every epoch end, overwriting: with monitor=None, save_top_k=1 keeps the latest epoch.
    # (save_last=True would write only when a top-k checkpoint was written at the same step.)
    last = Checkpoint(
        dirpath=resume.dir,
        filename=resume.last.stem,
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks = [
        Stopping(monitor=hp.monitor, mode=mode, patience=hp.patience),
        best,
        last,
        InterruptCheckpoint(resume.dir, filename=resume.last.stem),
        StayStopped(),
        LoggedEpochs(),
        EpochLine(),
        ReplicasInSync(),
    ]
    return callbacks, best


def determinism(hp: TrainParams, nondeterministic: list[str]) -> str:
    """What the run got: ``on``, ``off``, or ``partial (ops without a deterministic kernel)``."""
    if hp.deterministic is False:
        return "off"
    if nondeterministic:
        return f"partial ({', '.join(nondeterministic)})"
    return "on"


def values(params: Params, hp: TrainParams, model: ModelParams, tuned: frozenset[str]):
    """What the final training uses, key by key (:func:`pipeline.config.provenance`): the
    train section (but train.resume, which says how to continue, not what to train) and the
    model section."""
    return provenance("train", params.train, hp, tuned, fields=TRAIN_FIELDS) + provenance(
        "model", params.model, model, tuned
    )


def overridden(rows: list[dict]) -> str | None:
    """One line naming the params.yaml values that tuned values replace (the value asked for
    is not the one trained with) and how to train with them instead; None if there are none."""
    replaced = [r for r in rows if r["source"] == "tuned" and r["requested"] != r["effective"]]
    if not replaced:
        return None

    def brief(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else repr(value)

    shown = ", ".join(
        f"{r['key']} {brief(r['effective'])} (params.yaml: {brief(r['requested'])})"
        for r in replaced
    )
    narrow = ", ".join(
        f"{TUNABLE[r['key']]}: [{r['requested']!r}"
        + (f", {r['requested']!r}]" if TUNABLE[r["key"]] in RANGES else "]")
        for r in replaced[:2]
        if r["requested"] is not None
    )
    return (
        f"tuning decided {shown} ({BEST_PARAMS}); to train with params.yaml's values set "
        f"tune.n_trials: 0, or narrow tune.search_space (e.g. {narrow})"
    )


def run_name(hp: TrainParams, model: ModelParams, tuned: frozenset[str]) -> str:
    """A name that tells training runs apart in the UI's tables and chart legends, e.g.
    ``train · cnn · lr 2.7e-03 (tuned) · bs 32 (tuned)``, and under `dvc exp run` the
    experiment's name after it (``· brisk-lark``): two experiments whose changes tuning
    overrode train with the same values, and only that name tells their runs apart."""

    def origin(key: str) -> str:
        return " (tuned)" if key in tuned else ""

    experiment = os.environ.get("DVC_EXP_NAME")
    return (
        f"train · {model.name}{origin('model.name')} · lr {hp.lr:.1e}{origin('train.lr')} · "
        f"bs {hp.batch_size}{origin('train.batch_size')}"
        + (f" · {experiment}" if experiment else "")
    )


def run_description(data: Prepared, tuned: frozenset[str]) -> str:
    """The run's description (MLflow's ``mlflow.note.content``, shown on the run's page)."""
    where = (
        f"tuned values ({', '.join(sorted(tuned))}) from {BEST_PARAMS}, the rest from params.yaml"
        if tuned
        else "params.yaml values (no tuning)"
    )
    return (
        f"Final training on {data.manifest.source} ({len(data.tables['train'])} training "
        f"samples) with {where}."
    )


def train(
    hp: TrainParams,
    model: ModelParams,
    data: Prepared,
    experiment: str,
    out_dir: Path,
    resume: Resume | None = None,
    tuned: frozenset[str] = frozenset(),
    rows: list[dict] | None = None,
) -> dict:
    """Fit, keep the best checkpoint, save and log the model; return run.json's content.

    ``rows``: the values trained with and their sources (:func:`values`); without them,
    ``hp`` and ``model`` are logged as params.yaml values."""
    import mlflow
    from mlflow.models import infer_signature

    # A device this machine lacks stops the run here, before a checkpoint or run is touched.
    device = describe(available(hp.accelerator))
    resume = resume or Resume(resume_key(hp, model))
    ckpt_path, resumed_run = resume.find(hp.resume)
    experiment_id = tracking.setup(experiment)
    tags = tracking.run_tags("train", data.manifest.source)
    tags["mlflow.note.content"] = run_description(data, tuned)
    name = run_name(hp, model, tuned)
    with tracking.run(experiment_id, name, tags, run_id=resumed_run) as active:
        run_id = active.info.run_id
        resume.started(run_id)
        if resumed_run is None:
            if rows is None:
                rows = provenance("train", hp, hp, tuned, TRAIN_FIELDS) + provenance(
                    "model", model, model, tuned
                )
            tracking.log_values(rows)
            tracking.log_params({f"data.{s}_rows": len(t) for s, t in data.tables.items()})
            # The data this model learns from, for drift checks against later data.
            mlflow.log_dict(profile(data.tables["train"], data.manifest), PROFILE_ARTIFACT)
        print(f"[train] device {device}")
        mlflow.set_tag("device", device)
        callbacks, checkpoint = train_callbacks(hp, resume)
        # Asynchronous: an epoch's metrics go to the store while the next epoch trains (a
        # request to a team server takes tens of ms); flushed once training ends.
        logger = CheckpointedLogger(
            tracking_uri=tracking.tracking_uri(), run_id=run_id, synchronous=False
        )
        os.environ[CKPT_ENV] = str(ckpt_path or "")
        with tracking.async_metrics(), nondeterministic_ops() as ops:
            try:
                module, trainer = fit(
                    hp,
                    model,
                    data,
                    callbacks,
                    logger=logger,
                    ckpt_path=ckpt_path,
                    distributed=True,
                )
            except RuntimeError as exc:
                lost = lost_process(exc)
                if lost is None:
                    raise
                raise StageError(lost) from None
        mlflow.set_tag("determinism", determinism(hp, ops))
        held = trainer.datamodule
        where = {
            "device": "on the device",
            "host": "streamed from host memory",
            "disk": "streamed from disk (memory-mapped)",
        }[held.placement]
        print(f"[train] data {where} ({held.placement_reason})")
        mlflow.set_tag("data.placement", held.placement)
        # What one optimizer step saw: the per-device batch on every process, accumulated,
        # and train.lr scaled to that batch (train.lr_scaling).
        mlflow.log_params(
            {
                "train.world_size": trainer.world_size,
                "train.global_batch_size": global_batch(hp, trainer),
                "train.effective_lr": module.effective_lr,
            }
        )
        sync = next(c for c in callbacks if isinstance(c, ReplicasInSync))
        if sync.identical is not None:
            mlflow.set_tag("ddp.replicas_identical", str(sync.identical).lower())
        score = checkpoint.best_model_score
        best_score = float(score) if score is not None else math.nan
        if not checkpoint.best_model_path or not math.isfinite(best_score):
            raise StageError(f"training logged no finite {hp.monitor}: no model to keep")
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
        net = module.net.cpu().eval()
        torch.save(net.state_dict(), out_dir / "model.pt")
        spec = model_spec(model.name, data.manifest, model.channels, model.dropout)
        (out_dir / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
        mlflow.log_metrics(
            tracking.finite_metrics(
                {f"best_{hp.monitor}": best_score, "epochs_trained": trainer.current_epoch}
            )
        )
        # Served inputs are float32 raw values, whatever the storage dtype. The outputs are
        # one score per class, named in the signature and listed in the model's metadata:
        # the registry compares models by class name, never by output position.
        example = data.tensors["train"][0][:5].to(torch.float32).numpy()
        names = class_names(data.manifest)
        with torch.no_grad():
            output = pd.DataFrame(net(torch.from_numpy(example)).numpy(), columns=names)
        # MLflow exports the network with torch.export (weights on the CPU), and its pyfunc
        # loader refuses to put an exported program on another device than the one it was
        # exported on, while it defaults to the GPU where there is one: the input-example
        # check at logging loads it on the CPU (MLflow's documented prediction-device setting),
        # as does every host that loads it with MLFLOW_DEFAULT_PREDICTION_DEVICE=cpu or
        # model_config={"device": "cpu"}; mlflow.pytorch.load_model loads it anywhere, and
        # .to("cuda") moves it (README: The model).
        with env_scope({PREDICTION_DEVICE: "cpu"}):
            info = mlflow.pytorch.log_model(
                net,
                name="model",
                signature=infer_signature(example, output),
                input_example=example,
                metadata={"class_names": names},
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        mlflow.log_dict(spec, "model_spec.json")
        return {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "model_uri": info.model_uri,
            "runs_uri": f"runs:/{run_id}/model",
            f"best_{hp.monitor}": best_score,
            "epochs_trained": trainer.current_epoch,
        }


def main() -> None:
    if replica():
        train_replica()
        return
    # One training run at a time uses the checkpoints (a second one, e.g. beside a stage
    # whose dvc was killed, would resume and delete them under it): held until they are gone.
    with exclusive(LOCK, RESUME_DIR):
        train_stage()


def processes_per_host(hp: TrainParams) -> int:
    """The training processes on each machine, each of which loads the splits: ``devices: auto``
    is every GPU Lightning sees on a CUDA machine (its ``auto_device_count``), else one."""
    if isinstance(hp.devices, int):
        return hp.devices
    if resolve(hp.accelerator).type == "cuda":
        return max(1, CUDAAccelerator.auto_device_count())  # none: train stops on its line
    return 1


def train_replica() -> None:
    """Another process of a data-parallel training (``train.devices`` > 1, or another of
    ``train.num_nodes`` machines): the same model, data and callbacks, from the checkpoint
    the first process chose, and nothing else. Only the first process logs to MLflow and
    writes ``models/``, which it does once every process has finished."""
    params = load_params()
    hp, model = merged_params(params)
    data = load_prepared(
        splits=("train", "val"), placement=hp.data_placement, processes=processes_per_host(hp)
    )
    ckpt = os.environ.get(CKPT_ENV) or None
    callbacks, _ = train_callbacks(hp, Resume(resume_key(hp, model)))
    fit(hp, model, data, callbacks, ckpt_path=Path(ckpt) if ckpt else None, distributed=True)


def train_stage() -> None:
    params = load_params()
    hp, model = merged_params(params)
    tuned = frozenset(read_json(BEST_PARAMS)) if BEST_PARAMS.exists() else frozenset()
    rows = values(params, hp, model, tuned)
    line = overridden(rows)
    if line:
        print(f"[train] {line}")
    available(hp.accelerator)  # a device this machine lacks: one line, before any data is read
    data = load_prepared(
        splits=("train", "val"), placement=hp.data_placement, processes=processes_per_host(hp)
    )
    pretrained = f", weights {model.weights_path}" if model.weights_path else ""
    frozen = ", backbone frozen" if model.freeze_backbone else ""
    augment = f", augment {'+'.join(hp.augment)}" if hp.augment else ""
    print(
        f"[train] {model.name} (channels {model.channels}, dropout {model.dropout:g}"
        f"{pretrained}{frozen}), {hp.optimizer} lr {hp.lr:.3g}, batch {hp.batch_size}"
        f"{augment}, up to {hp.max_epochs} epochs on {len(data.tables['train'])} samples"
    )
    start = time.perf_counter()
    resume = Resume(resume_key(hp, model))
    with atomic_dir(MODELS_DIR) as tmp:
        run = train(hp, model, data, params.mlflow.experiment, tmp, resume, tuned, rows)
        write_json(tmp / "run.json", run)
    resume.finished()
    print(
        f"[train] best {hp.monitor} {run[f'best_{hp.monitor}']:.4f} after "
        f"{run['epochs_trained']} epochs ({time.perf_counter() - start:.0f}s); "
        f"MLflow run {run['run_id']}"
    )


if __name__ == "__main__":
    run_stage("train", main)
