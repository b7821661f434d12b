"""What tune and train share: seeding and one Lightning fit.

The splits (:func:`pipeline.data.loader.load_prepared`, which scoring uses too, without
Lightning) are loaded once into memory and moved to the training device once; batches are
gathered from those tensors there (see :class:`pipeline.data.loader.TensorBatches`). Splits
too large for that are streamed: from host memory, or memory-mapped from disk.
:func:`trainer_options` says what the Trainer is built with; :func:`fit` trains inside a
scope that puts back what a fit changes in the process (environment variables, torch's
determinism flags, Lightning's logger levels, warning filters, signal handlers).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.profilers import PassThroughProfiler

from pipeline.config import ModelParams, TrainParams
from pipeline.data.loader import Prepared, TensorBatches
from pipeline.data.mapped import megabytes
from pipeline.data.table import Manifest
from pipeline.device import available, resolve
from pipeline.io import StageError, atomic_path, set_env
from pipeline.models import build_net, incompatibility, model_spec
from pipeline.models.cnn import Scale
from pipeline.models.module import Classifier
from pipeline.models.resnet import ResNet18, WeightsError

# Lift PYTORCH_NVML_BASED_CUDA_CHECK during a fit (see fit_environment); False to measure
# without, or per call with fit(..., plain_cuda_check=False).
PLAIN_CUDA_CHECK = True

# Warnings a fit silences: a frozen backbone is in eval mode on purpose, metrics are logged
# per epoch (the step logging interval does not matter), a deprecation inside Lightning, and
# Lightning's notes on what the train stage does on purpose: its state.json lives beside the
# checkpoints, and with an OnExceptionCheckpoint fit(ckpt_path=None) looks for a last
# checkpoint (Resume.find has removed any that must not be resumed).
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 on torch 2.14
    r"Checkpoint directory .* exists and is not empty",
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint available",
)


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and torch. Whether kernels are deterministic is the Trainer's
    ``deterministic`` (``train.deterministic``), set for the fit only."""
    pl.seed_everything(seed, workers=True, verbose=False)


# Data is moved to the GPU when it takes at most this share of the GPU's free memory: the rest
# is for the network, its activations and the optimiser.
DEVICE_SHARE = 0.5


def placement(asked: str, nbytes: int, device: torch.device) -> tuple[str, str]:
    """Where the splits live while training (``train.data_placement``) and why, in words.
    (Splits that ``load_prepared`` memory-mapped stay there unless this says a GPU.)"""
    size = megabytes(nbytes)
    if asked != "auto":
        return asked, f"{size}, train.data_placement: {asked}"
    if device.type != "cuda":
        return "device", f"{size} in {device.type} memory"
    free, _ = torch.cuda.mem_get_info(device)
    share = f"{size}, {free / 2**30:.1f} GB free on {device}"
    if nbytes <= DEVICE_SHARE * free:
        return "device", share
    return "host", f"{share}: more than {DEVICE_SHARE:.0%} of it"


class InMemoryData(pl.LightningDataModule):
    """Train/val tensors moved to the training device once; batches are gathered there. Or,
    as ``placement`` says, batches gathered from the tensors in host memory (``host``) or
    memory-mapped from disk (``disk``) and copied to the device as they are needed.

    Its state (in every checkpoint, restored before the loaders are made) is where the
    training batches stand: the shuffle generator's state and the batches served of an
    unfinished pass. Lightning restores a loader's own state only when it resumes inside an
    epoch; from a checkpoint written at an epoch end it would start the next epoch with a
    fresh generator, i.e. the first epoch's order."""

    def __init__(self, data: Prepared, batch_size: int, seed: int, asked: str = "auto") -> None:
        super().__init__()
        self.data, self.batch_size, self.seed, self.asked = data, batch_size, seed, asked
        self.placement, self.placement_reason = "device", ""
        self.train_batches: TensorBatches | None = None
        self.restored: dict | None = None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        splits = {k: v for k, v in self.data.tensors.items() if k in ("train", "val")}
        nbytes = sum(t.nbytes for pair in splits.values() for t in pair)
        where = placement(self.asked, nbytes, device)
        # Memory-mapped by load_prepared: streamed from there, unless they go to a GPU.
        if self.data.storage == "disk" and not (where[0] == "device" and device.type == "cuda"):
            where = "disk", self.data.storage_reason
        # The first process decides for all: data-parallel processes step together, at the
        # pace of the slowest (and one that loaded the splits otherwise streams them alike).
        self.placement, self.placement_reason = self.trainer.strategy.broadcast(where, src=0)
        if self.streamed:
            self.on_device = splits  # batches are gathered and copied as they are needed
        else:
            self.on_device = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}

    def train_dataloader(self) -> TensorBatches:
        x, y = self.on_device["train"]
        # Data-parallel: each process trains on its share of every shuffled pass. Validation
        # runs on the whole val split in every process (it is small, and no sample counts
        # twice in the metrics).
        self.train_batches = TensorBatches(
            x,
            y,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            rank=self.trainer.global_rank,
            world=self.trainer.world_size,
            pin=self.pinned(),
        )
        if self.restored is not None:
            self.train_batches.load_state_dict(self.restored)
        return self.train_batches

    def state_dict(self) -> dict:
        if self.train_batches is None:
            return {}
        return {"train_batches": self.train_batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state.get("train_batches")

    def val_dataloader(self) -> TensorBatches:
        x, y = self.on_device["val"]
        return TensorBatches(x, y, max(self.batch_size, 512), pin=self.pinned())

    @property
    def streamed(self) -> bool:
        """Whether batches are gathered off the device and copied to it one at a time."""
        return self.placement in ("host", "disk")

    def pinned(self) -> bool:
        """Whether batches go through page-locked memory: data streamed, training on a GPU."""
        return self.streamed and self.trainer.strategy.root_device.type == "cuda"

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if self.streamed:  # pinned: the copy overlaps the work queued before it
            return tuple(t.to(device, non_blocking=t.is_pinned()) for t in batch)
        return batch  # gathered from tensors already on the device: nothing to move per step


class WholeCheckpoints(TorchCheckpointIO):
    """Lightning's checkpoint reader, and a writer that ``torch.save``s each file beside its
    path and moves it into place (:func:`pipeline.io.atomic_path`): a process killed while
    writing leaves the previous checkpoint whole. (Lightning's own writer serialises the
    whole checkpoint into memory first, a second copy of the weights and optimiser state,
    and then writes it through the system's temporary folder, which is a plain copy, not a
    move, where that folder is another file system.) A URL's checkpoints (``s3://…``) are
    Lightning's to write, through fsspec."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        files, local = url_to_fs(str(path))  # a path, file://… or a URL
        if not isinstance(files, LocalFileSystem):  # s3://… and such: Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(local) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)  # a file object: entries named as for any path


NO_OP = contextlib.nullcontext()  # stateless: one serves every hook, nested or not


class NoOpProfiler(PassThroughProfiler):
    """Lightning's default profiler, which records nothing, with :meth:`profile` handing out
    one shared do-nothing context: the Trainer enters ``profile()`` around every hook it
    calls (about 60 times per optimiser step), and the default builds a generator-based
    context manager each time, about 50 µs per step on 2 CPU cores (4 % of a small
    model's step)."""

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return NO_OP


class KeyedOnce:
    """A Lightning callback whose ``state_key`` (its state's key in a checkpoint) is worked
    out once, on first use. The Trainer formats the key into a name around every hook it
    calls on every callback (about 6 hooks a step), and ModelCheckpoint and EarlyStopping
    build theirs from their settings each time: 3 and 2 µs on 2 CPU cores, about 50 µs a
    step for the train stage's three. Those settings are fixed when the callback is made, so
    the key is the same."""

    @functools.cached_property
    def state_key(self) -> str:
        return super().state_key


class Checkpoint(KeyedOnce, ModelCheckpoint):
    """Lightning's ModelCheckpoint (see :class:`KeyedOnce`)."""


class Stopping(KeyedOnce, EarlyStopping):
    """Lightning's EarlyStopping (see :class:`KeyedOnce`)."""


class MetricHistory(pl.Callback):
    """Collects the logged metrics at every validation (``history[i]`` is the i-th one's
    dict: epoch i's when a training validates once an epoch)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.history.append(
                {k: v.item() for k, v in trainer.callback_metrics.items() if k != "step"}
            )


class EpochLine(pl.Callback):
    """One progress line per epoch: losses, accuracy and time (quiet, log-friendly)."""

    def __init__(self, prefix: str = "[train]") -> None:
        self.prefix = prefix

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()  # a run resumed mid-epoch starts no epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not hasattr(self, "_start") or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"{k} {m[k].item():.4f}" for k in ("train/loss", "val/loss", "val/acc") if k in m]
        print(
            f"{self.prefix} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  "
            + "  ".join(parts)
            + f"  ({time.perf_counter() - self._start:.1f}s)",
            flush=True,
        )


def check_model(model: ModelParams, manifest: Manifest, augment: list[str] = ()) -> None:
    """Refuse a model or augmentation that cannot take this data, before any training."""
    problem = incompatibility(model.name, manifest.image_shape, manifest.source)
    if problem:
        raise StageError(f"params.yaml: model.name: {problem}")
    if augment and len(manifest.image_shape) != 3:
        raise StageError(
            f"params.yaml: train.augment: {list(augment)} applies to images, but data source "
            f"{manifest.source!r} is tabular; set train.augment: []"
        )


def build_module(hp: TrainParams, model: ModelParams, data: Prepared) -> Classifier:
    """The network for ``model`` (pretrained and frozen as asked), wrapped for training.

    Tabular inputs are standardised with the training split's mean and standard deviation,
    stored in the network so the logged model takes raw features."""
    manifest = data.manifest
    check_model(model, manifest, hp.augment)
    net = build_net(model_spec(model.name, manifest, model.channels, model.dropout))
    for layer in net.modules():
        if isinstance(layer, Scale) and manifest.pixel_range is None:
            layer.fit(data.tensors["train"][0])
    if isinstance(net, ResNet18) and model.weights_path:
        try:
            fresh = net.load_backbone(model.weights_path)
        except WeightsError as exc:
            raise StageError(f"model.weights_path: {exc}") from None
        if model.freeze_backbone:
            net.freeze_backbone(except_stem=bool(fresh))
    return Classifier(
        net,
        hp.lr,
        hp.optimizer,
        hp.weight_decay,
        hp.max_epochs,
        hp.augment,
        batch_size=hp.batch_size,
        lr_batch_size=hp.lr_batch_size,
        lr_scaling=hp.lr_scaling,
        compile=hp.compile,
    )


def trainer_options(
    hp: TrainParams, checkpointing: bool = False, distributed: bool = False
) -> dict:
    """The keyword arguments :func:`fit` builds its Trainer with (besides logger, callbacks
    and root directory). ``checkpointing``: whether the callbacks include a ModelCheckpoint
    (without one Lightning would add its own). ``distributed``: train.devices, strategy and
    num_nodes apply (the train stage); else one device (tuning trials)."""
    parallel = {"devices": 1}
    if distributed:
        parallel = {"devices": hp.devices, "strategy": hp.strategy, "num_nodes": hp.num_nodes}
    return {
        "accelerator": hp.accelerator,
        **parallel,
        "max_epochs": hp.max_epochs,
        "precision": hp.precision,
        "deterministic": hp.deterministic,
        "gradient_clip_val": hp.gradient_clip_val,
        "accumulate_grad_batches": hp.accumulate_grad_batches,
        "enable_checkpointing": checkpointing,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "profiler": NoOpProfiler(),
    }


def check_schedule(batches: int, checks: int) -> dict:
    """Trainer options that validate at least ``checks`` times an epoch of ``batches``
    batches, the last time at its end: every ``batches // checks`` batches, the epoch cut to
    ``checks`` times that (fewer than ``checks`` batches left out), or after each batch when
    an epoch has fewer than twice ``checks`` (where that cut could leave out a third of it).
    (Lightning's fractional ``val_check_interval`` validates every ``int(batches ×
    fraction)`` batches and not at the epoch's end: 5 times an epoch of 10 batches for 0.25,
    and the batches after the last check go unjudged.)"""
    if checks == 1:
        return {}
    if batches < 2 * checks:
        return {"val_check_interval": 1}
    every = batches // checks
    return {"val_check_interval": every, "limit_train_batches": every * checks}


def fit_environment(hp: TrainParams, plain_cuda_check: bool | None = None) -> dict:
    """Environment variables set (a string) or removed (None) for the duration of a fit.

    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for deterministic cuBLAS on a CUDA device when
    ``deterministic`` is true or ``"warn"`` (torch reads it when it first uses cuBLAS in the
    process). ``plain_cuda_check`` (None: :data:`PLAIN_CUDA_CHECK`) lifts
    ``PYTORCH_NVML_BASED_CUDA_CHECK``, which importing Lightning sets for the whole process
    to keep forked workers CUDA-safe: with it set, ``torch.cuda.is_available()`` asks NVML on
    every call until CUDA is initialised, and Adam/AdamW call it on every ``step()`` (40-85 µs
    per step when training on the CPU, more where an NVIDIA driver is installed; nothing once
    CUDA is in use). Nothing forks during a fit: batches come from in-memory tensors."""
    if plain_cuda_check is None:
        plain_cuda_check = PLAIN_CUDA_CHECK
    env: dict[str, str | None] = {}
    if hp.deterministic and resolve(hp.accelerator).type == "cuda":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if plain_cuda_check:
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = None
    return env


QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# Its one line says which process of a data-parallel training died, before Lightning stops
# the others (SIGKILL, the first process included).
CHILD_OBSERVER = "lightning.fabric.strategies.launchers.subprocess_script"


@contextlib.contextmanager
def fit_scope(env: dict[str, str | None]) -> Iterator[None]:
    """Run a fit with ``env`` applied, Lightning's loggers at WARNING (its start-up banners
    would drown the per-epoch lines; but :data:`CHILD_OBSERVER`) and :data:`QUIET_WARNINGS`
    silenced; on exit put back the environment, torch's deterministic-algorithms and cuDNN
    benchmark flags (which the Trainer sets for the process), the logger levels and the
    warning filters."""
    keys = {*env, "CUBLAS_WORKSPACE_CONFIG"}  # the Trainer sets the latter when deterministic
    saved_env = {key: os.environ.get(key) for key in keys}
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    loggers = [logging.getLogger(name) for name in (*QUIET_LOGGERS, CHILD_OBSERVER)]
    levels = [logger.level for logger in loggers]
    try:
        set_env(env)
        for logger in loggers:
            logger.setLevel(logging.WARNING if logger.name in QUIET_LOGGERS else logging.INFO)
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        set_env(saved_env)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")


@contextlib.contextmanager
def nondeterministic_ops() -> Iterator[list[str]]:
    """The ops torch warned have no deterministic kernel while the block ran (with
    ``deterministic: warn``, e.g. ``adaptive_avg_pool2d_backward_cuda``); the warnings still
    show as they would."""
    found: list[str] = []
    with warnings.catch_warnings():
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            match = NONDETERMINISTIC.search(str(message))
            if match and match[1] not in found:
                found.append(match[1])
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        yield found


class SignalsAtStepEnd(pl.Callback):
    """Delivers SIGTERM and SIGINT (^C) at the end of a training step rather than wherever
    they arrive, so an interruption (and the checkpoint saved on it, see
    ``OnExceptionCheckpoint``) falls where Lightning resumes exactly: after an optimizer step,
    never inside one or inside a gradient-accumulation window, and not after an epoch's last
    batch (that epoch's validation and epoch end still run; for SIGTERM Lightning then stops
    at the epoch end itself). A second signal of the same kind acts at once.

    Only signals whose handler is a Python function are deferred (tracking.run's SIGTERM
    handler, Python's ^C handler), and only in the main thread; :meth:`deferring` installs
    the deferral and puts the handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.handlers: dict[int, object] = {}
        self.pending: list[tuple[int, object]] = []
        self.exception: BaseException | None = None

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):
                    self.handlers[signum] = handler
                    signal.signal(signum, self._defer)
        try:
            yield
        finally:
            handlers, self.handlers = self.handlers, {}
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self.deliver(handlers)  # one that came after the last step acts now

    def _defer(self, signum: int, frame) -> None:
        if any(pending == signum for pending, _ in self.pending):
            self.handlers[signum](signum, frame)  # the second time: at once
        self.pending.append((signum, frame))

    def deliver(self, handlers: dict | None = None) -> None:
        """Call the original handler of each signal received so far (they raise)."""
        handlers = self.handlers if handlers is None else handlers
        pending, self.pending = self.pending, []
        for signum, frame in pending:
            handlers[signum](signum, frame)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            self.pending
            and (batch_idx + 1) % trainer.accumulate_grad_batches == 0
            and batch_idx + 1 < trainer.num_training_batches
        ):
            self.deliver()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


def fit(
    hp: TrainParams,
    model: ModelParams,
    data: Prepared,
    callbacks: list[pl.Callback],
    logger=False,
    default_root_dir: str | None = None,
    ckpt_path: Path | None = None,
    plain_cuda_check: bool | None = None,
    distributed: bool = False,
    checks_per_epoch: int = 1,
) -> tuple[Classifier, pl.Trainer]:
    """Seed, build and train one model on the train split, validating on val every epoch
    (``checks_per_epoch`` times an epoch, one device: see :func:`check_schedule`).

    With ``ckpt_path``, training continues from that checkpoint (loaded weights-only).
    ``plain_cuda_check`` (None: :data:`PLAIN_CUDA_CHECK`): see :func:`fit_environment`.
    SIGTERM and ^C stop at the next step end (see :class:`SignalsAtStepEnd`) with the
    exception their handlers raise (``pipeline.io.Terminated`` under ``tracking.run``;
    ``KeyboardInterrupt``, which Lightning alone would turn into ``sys.exit(1)``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if checks_per_epoch > 1 and distributed:
        raise ValueError("checks inside an epoch count one device's batches: tuning trials only")
    device = available(hp.accelerator)  # a device this machine lacks: one line, before the Trainer
    if hp.precision == "16-mixed" and device.type != "cuda":
        raise StageError(
            f"params.yaml: train.precision: 16-mixed needs a CUDA GPU, and this training runs "
            f"on {device.type}; use bf16-mixed or 32-true"
        )
    set_seeds(hp.seed)
    module = build_module(hp, model, data)
    signals = SignalsAtStepEnd()
    callbacks = [*callbacks, signals]
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    with fit_scope(fit_environment(hp, plain_cuda_check)), signals.deferring():
        trainer = pl.Trainer(
            **trainer_options(hp, checkpointing, distributed),
            **check_schedule(-(-len(data.tensors["train"][1]) // hp.batch_size), checks_per_epoch),
            logger=logger,
            callbacks=callbacks,
            default_root_dir=default_root_dir,
            plugins=[WholeCheckpoints()] if checkpointing else None,
        )
        try:
            trainer.fit(
                module,
                datamodule=InMemoryData(data, hp.batch_size, hp.seed, hp.data_placement),
                ckpt_path=ckpt_path,
                weights_only=True,
            )
        except SIGTERMException:  # Lightning's own stop at an epoch end, after SIGTERM
            signals.deliver()
            raise
        except SystemExit:
            if isinstance(signals.exception, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise
    return module, trainer
