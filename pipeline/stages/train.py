"""Train: the final model, with params.yaml's ``train`` section merged with the tuned values.

Seeded and deterministic on the CPU; early stopping and the kept (best) weights follow
``train.monitor``. Per-epoch metrics go to MLflow through Lightning's MLFlowLogger, sent in
batches (tracking URI passed explicitly), and the network is logged as an MLflow model with
a signature and an input example. Writes ``models/``: ``model.pt`` (the weights of the best
epoch), ``model.json`` (what it takes to rebuild it) and ``run.json`` (MLflow run id and
model URI).

Interrupted training resumes. The resume checkpoint is ``.runway/train/last.ckpt`` (outside
``models/``, which DVC clears before each run), taken at epoch ends (see ResumePoint); on
SIGTERM or ^C the stage writes the latest epoch's, ends the MLflow run KILLED and exits 143
(130 for ^C). The next run with the same params and data picks the checkpoint up and
continues the same MLflow run (``train.resume: auto``); ``must`` makes a missing checkpoint
an error, ``never`` starts afresh. Checkpoints are loaded weights-only.
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
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.apply_func import apply_to_collection

from pipeline import tracking
from pipeline.config import ModelParams, Params, TrainParams, direction, load_params, with_tuned
from pipeline.data.table import PREPARED_DIR
from pipeline.io import (
    StageError,
    Terminated,
    atomic_dir,
    load_error,
    read_json,
    run_stage,
    write_json,
)
from pipeline.models import MODELS_DIR, model_spec
from pipeline.training import EpochLine, Prepared, Throttle, fit, load_prepared

BEST_PARAMS = Path("reports/tune/best_params.json")
RESUME_DIR = Path(".runway/train")


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
            epoch = int(checkpoint["epoch"])
        except Exception as exc:  # truncated, corrupt, or a pickle payload
            raise StageError(
                f"{self.last}: cannot resume from this checkpoint ({load_error(exc)}); "
                "delete it or set train.resume: never"
            ) from None
        print(f"[train] resuming the interrupted run from {self.last} (after epoch {epoch + 1})")
        return self.last, state["run_id"]

    def started(self, run_id: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.state, {"key": self.key, "run_id": run_id})

    def finished(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _to_cpu(state):
    """A copy of a checkpoint dict with every tensor copied to the CPU (training goes on
    updating the originals in place)."""
    return apply_to_collection(state, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


class ResumePoint(pl.Callback):
    """The state to resume from (weights, optimiser, schedule, early-stopping and loop state),
    taken at the end of every epoch, and written to ``last.ckpt``.

    The state is copied to memory every epoch (about 1 ms for the digits CNN). It is written
    to disk after the first epoch, then whenever writing costs at most 1% of the training time
    since the last write (a checkpoint that takes 5 ms to write waits 0.5 s) and at least
    every 10 minutes (see :class:`Throttle`). On SIGTERM or ^C the latest epoch's state is
    written before the process exits, so no finished epoch is lost; only SIGKILL loses the
    epochs since the last write. The last epoch's is written when training ends, so a crash
    while the model is saved and logged never trains again. A checkpoint at an epoch
    boundary is what Lightning resumes exactly; one taken mid-epoch would replay part of it."""

    def __init__(self, path: Path, throttle: Throttle | None = None) -> None:
        self.path = path
        self.throttle = throttle or Throttle(budget=0.01, max_wait=600.0)
        self.snapshot: dict | None = None
        self.snapshot_epoch: int | None = None
        self.saved_epoch: int | None = None

    def write(self) -> None:
        if self.snapshot is None or self.saved_epoch == self.snapshot_epoch:
            return
        with self.throttle.timed():
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.snapshot, tmp)
            os.replace(tmp, self.path)
        self.saved_epoch = self.snapshot_epoch

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # What trainer.save_checkpoint(path) would write now, copied aside.
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self.snapshot, self.snapshot_epoch = _to_cpu(state), trainer.current_epoch + 1
        if self.throttle.due():
            self.write()

    def on_train_end(self, trainer, pl_module) -> None:
        # Training is done: a crash while the model is saved and logged must not redo it.
        self.write()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (Terminated, KeyboardInterrupt)):
            return
        self.write()
        if self.saved_epoch is None:
            print(
                "[train] interrupted in epoch 1, before any checkpoint: the next run starts afresh"
            )
            return
        print(
            f"[train] interrupted in epoch {trainer.current_epoch + 1}: checkpoint of epoch "
            f"{self.saved_epoch} saved to {self.path}; run the stage again to resume",
            flush=True,
        )


class BatchedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, sending the epochs' metrics in batches.

    Each ``log_batch`` to the SQLite store costs about 8 ms, 3-4% of a digits epoch. Metrics
    are buffered and sent when sending costs at most 1% of the training time, and at least
    every 30 seconds (see :class:`Throttle`); whatever is left is sent when training ends,
    fails or is interrupted, so the run always has every epoch."""

    def __init__(self, *args, throttle: Throttle | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.throttle = throttle or Throttle(budget=0.01, max_wait=30.0)
        self.pending: list = []

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if not isinstance(value, str):
                key = re.sub(r"[^a-zA-Z0-9_/. -]+", "", key)  # as MLFlowLogger does
                self.pending.append(
                    Metric(key=key, value=float(value), timestamp=now, step=step or 0)
                )
        if self.throttle.due():
            self.flush()

    def flush(self) -> None:
        with self.throttle.timed():
            for i in range(0, len(self.pending), 1000):  # MLflow's limit per batch
                self.experiment.log_batch(run_id=self.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self.pending:
            self.flush()
        super().finalize(status)


class BestWeights(pl.Callback):
    """Keeps a CPU copy of the weights of the best epoch so far by ``monitor``.

    A copy in memory rather than a checkpoint file per improvement: the weights are all the
    final model needs, and the copy travels in the resume checkpoint (``state_dict``)."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.score: float | None = None
        self.epoch: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = trainer.callback_metrics[self.monitor].item()
        if not math.isfinite(score):
            return
        if self.score is None or (score < self.score if self.mode == "min" else score > self.score):
            self.score, self.epoch = score, trainer.current_epoch + 1
            self.weights = _to_cpu(pl_module.state_dict())

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "weights": self.weights}

    def load_state_dict(self, state_dict: dict) -> None:
        self.score, self.epoch = state_dict["score"], state_dict["epoch"]
        self.weights = state_dict["weights"]


def resume_key(hp: TrainParams, model: ModelParams) -> str:
    what = {
        "train": hp.model_dump(exclude={"resume", "accelerator"}),
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


def train_callbacks(hp: TrainParams, resume: Resume) -> tuple[list[pl.Callback], BestWeights]:
    """What the train stage trains with: early stopping, the best weights, one line per
    epoch and the resume point. Returns the callbacks and the best-weights one."""
    from lightning.pytorch.callbacks import EarlyStopping

    mode = "max" if direction(hp.monitor) == "maximize" else "min"
    best = BestWeights(hp.monitor, mode)
    # All decide right after validation, where ResumePoint takes its copy: a resumed run then
    # continues with the next epoch instead of re-checking an epoch whose metrics are gone.
    callbacks = [
        EarlyStopping(
            monitor=hp.monitor, mode=mode, patience=hp.patience, check_on_train_epoch_end=False
        ),
        best,
        EpochLine(),
        ResumePoint(resume.last),
    ]
    return callbacks, best


def train(
    hp: TrainParams,
    model: ModelParams,
    data: Prepared,
    experiment: str,
    out_dir: Path,
    resume: Resume | None = None,
) -> dict:
    """Fit, keep the best checkpoint, save and log the model; return run.json's content."""
    import mlflow
    from mlflow.models import infer_signature

    resume = resume or Resume(resume_key(hp, model))
    ckpt_path, resumed_run = resume.find(hp.resume)
    experiment_id = tracking.setup(experiment)
    tags = tracking.run_tags("train", data.manifest.source)
    with tracking.run(experiment_id, "train", tags, run_id=resumed_run) as active:
        run_id = active.info.run_id
        resume.started(run_id)
        if resumed_run is None:
            tracking.log_params(hp.model_dump(exclude={"resume"}))
            tracking.log_params({f"model.{k}": v for k, v in model.model_dump().items()})
            tracking.log_params({f"data.{s}_rows": len(t) for s, t in data.tables.items()})
        callbacks, best = train_callbacks(hp, resume)
        logger = BatchedMLFlowLogger(tracking_uri=tracking.tracking_uri(), run_id=run_id)
        module, trainer = fit(hp, model, data, callbacks, logger=logger, ckpt_path=ckpt_path)
        if best.weights is None:
            raise StageError(f"training logged no finite {hp.monitor}: no model to keep")
        module.load_state_dict(best.weights)
        net = module.net.cpu().eval()
        torch.save(net.state_dict(), out_dir / "model.pt")
        spec = model_spec(model.name, data.manifest, model.channels, model.dropout)
        (out_dir / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
        best_score = best.score
        mlflow.log_metrics(
            tracking.finite_metrics(
                {f"best_{hp.monitor}": best_score, "epochs_trained": trainer.current_epoch}
            )
        )
        # Served inputs are float32 raw values, whatever the storage dtype.
        example = data.tensors["train"][0][:5].to(torch.float32).numpy()
        with torch.no_grad():
            output = net(torch.from_numpy(example)).numpy()
        info = mlflow.pytorch.log_model(
            net,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
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
    params = load_params()
    hp, model = merged_params(params)
    data = load_prepared(splits=("train", "val"))
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
        run = train(hp, model, data, params.mlflow.experiment, tmp, resume)
        write_json(tmp / "run.json", run)
    resume.finished()
    print(
        f"[train] best {hp.monitor} {run[f'best_{hp.monitor}']:.4f} after "
        f"{run['epochs_trained']} epochs ({time.perf_counter() - start:.0f}s); "
        f"MLflow run {run['run_id']}"
    )


if __name__ == "__main__":
    run_stage("train", main)
