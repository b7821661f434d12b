"""What tune and train share: the prepared data as tensors, seeding, and one Lightning fit.

The splits are loaded once into memory and moved to the training device once; batches are
slices of those tensors (see :class:`pipeline.data.loader.TensorBatches`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch

from pipeline.config import ModelParams, TrainParams
from pipeline.data.loader import TensorBatches, to_tensors
from pipeline.data.table import PREPARED_DIR, Manifest
from pipeline.io import StageError, read_json
from pipeline.models import build_net, incompatibility, model_spec
from pipeline.models.cnn import Scale
from pipeline.models.module import Classifier
from pipeline.models.resnet import ResNet18, WeightsError

# Deterministic cuBLAS on GPUs; harmless on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Lightning's start-up banners (devices found, tips) would drown the per-epoch lines.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# A frozen backbone is deliberately in eval mode (its batch-norm statistics stay as loaded).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start")


@contextlib.contextmanager
def plain_cuda_check():
    """Let ``torch.cuda.is_available()`` use its cached runtime answer while training.

    Importing Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` for the whole process (it
    keeps forked workers CUDA-safe). With it set, every call loads and initialises NVML, and
    Adam/AdamW call ``is_available()`` on every ``step()``: about 85 µs per step on the CPU
    here, more where an NVIDIA driver is installed. Nothing is forked during a fit (batches are
    slices of in-memory tensors), so the variable is lifted for its duration."""
    saved = os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved


class Throttle:
    """When a periodic side job of training (writing a checkpoint, sending metrics to the
    tracking store) is due, so that it takes at most ``budget`` of the wall time.

    The first time it is always due; after that, once the time since the job last ran is at
    least its last duration divided by ``budget`` (1%: a 5 ms write waits 0.5 s), or
    ``max_wait`` seconds, whichever is shorter."""

    def __init__(self, budget: float = 0.01, max_wait: float = 600.0, clock=time.monotonic):
        self.budget, self.max_wait, self.clock = budget, max_wait, clock
        self.last: float | None = None
        self.cost = 0.0

    def due(self) -> bool:
        if self.last is None:
            return True
        return self.clock() - self.last >= min(self.cost / self.budget, self.max_wait)

    @contextlib.contextmanager
    def timed(self):
        """Run the job inside this block; its duration sets the next wait."""
        start = self.clock()
        yield
        self.last = self.clock()
        self.cost = self.last - start


@dataclass
class Prepared:
    manifest: Manifest
    tables: dict[str, pd.DataFrame]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_prepared(prepared_dir: Path = PREPARED_DIR, splits=("train", "val", "test")) -> Prepared:
    """Read the validated splits and their manifest."""
    manifest_path = prepared_dir / "manifest.json"
    if not manifest_path.exists():
        raise StageError(f"{manifest_path} not found: run the validate stage first")
    manifest = Manifest.from_dict(read_json(manifest_path))
    tables, tensors = {}, {}
    for split in splits:
        path = prepared_dir / f"{split}.parquet"
        if not path.exists():
            raise StageError(f"{path} not found: run the validate stage first")
        tables[split] = pd.read_parquet(path)
        tensors[split] = to_tensors(tables[split], manifest.image_shape)
    return Prepared(manifest, tables, tensors)


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and torch, and make torch pick deterministic kernels."""
    pl.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)


class InMemoryData(pl.LightningDataModule):
    """Train/val tensors moved to the training device once; batches are slices."""

    def __init__(self, data: Prepared, batch_size: int, seed: int) -> None:
        super().__init__()
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        self.on_device = {
            split: (x.to(device), y.to(device))
            for split, (x, y) in self.data.tensors.items()
            if split in ("train", "val")
        }

    def train_dataloader(self) -> TensorBatches:
        x, y = self.on_device["train"]
        return TensorBatches(x, y, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> TensorBatches:
        x, y = self.on_device["val"]
        return TensorBatches(x, y, max(self.batch_size, 512))


class MetricHistory(pl.Callback):
    """Collects every epoch's logged metrics (``history[i]`` is epoch i's dict)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.history.append({k: v.item() for k, v in trainer.callback_metrics.items()})


class EpochLine(pl.Callback):
    """One progress line per epoch: losses, accuracy and time (quiet, log-friendly)."""

    def __init__(self, prefix: str = "[train]") -> None:
        self.prefix = prefix

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not hasattr(self, "_start"):
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
    return Classifier(net, hp.lr, hp.optimizer, hp.weight_decay, hp.max_epochs, hp.augment)


def fit(
    hp: TrainParams,
    model: ModelParams,
    data: Prepared,
    callbacks: list[pl.Callback],
    logger=False,
    default_root_dir: str | None = None,
    ckpt_path: Path | None = None,
) -> tuple[Classifier, pl.Trainer]:
    """Seed, build and train one model on the train split, validating on val every epoch.

    With ``ckpt_path``, training continues from that checkpoint (loaded weights-only)."""
    set_seeds(hp.seed)
    module = build_module(hp, model, data)
    trainer = pl.Trainer(
        accelerator=hp.accelerator,
        devices=1,
        max_epochs=hp.max_epochs,
        deterministic=True,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # the train stage keeps its own (see stages/train.py)
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=default_root_dir,
    )
    with plain_cuda_check():
        trainer.fit(
            module,
            datamodule=InMemoryData(data, hp.batch_size, hp.seed),
            ckpt_path=ckpt_path,
            weights_only=True,
        )
    return module, trainer
