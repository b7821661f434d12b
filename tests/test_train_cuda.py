"""Training on a CUDA GPU (skipped without one): every model trains with the default
``train.deterministic: warn``, and no training step waits for the device."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from pipeline.config import ModelParams, TrainParams
from pipeline.data.loader import Prepared, to_tensors
from pipeline.data.table import Manifest, make_table
from pipeline.models import IMAGE_MODELS, MODELS
from pipeline.training import fit, nondeterministic_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_data(image_shape: list[int], n: int = 192, classes: int = 4) -> Prepared:
    rng = np.random.default_rng(0)
    images = len(image_shape) == 3
    features = rng.integers(0, 256, size=(n, int(np.prod(image_shape)))).astype(
        np.uint8 if images else np.float32
    )
    table = make_table(features, np.arange(n) % classes)
    pixel_range = [0.0, 255.0] if images else None
    manifest = Manifest("test", n, "sha256:x", list(range(classes)), image_shape, pixel_range)
    cut = 2 * n // 3
    tables = {"train": table[:cut].reset_index(drop=True), "val": table[cut:]}
    tables["val"] = tables["val"].reset_index(drop=True)
    return Prepared(manifest, tables, {s: to_tensors(t, image_shape) for s, t in tables.items()})


class NoSyncInSteps(pl.Callback):
    """Makes any host-device synchronisation inside a training step an error."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, pl_module, exception):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_on_cuda_with_the_default_determinism(name):
    shape = [3, 32, 32] if name in IMAGE_MODELS else [16]
    data = random_data(shape)
    hp = TrainParams(max_epochs=2, batch_size=32, accelerator="cuda", gradient_clip_val=1.0)
    assert hp.deterministic == "warn"
    with nondeterministic_ops() as ops:
        module, trainer = fit(hp, ModelParams(name=name, channels=8), data, [NoSyncInSteps()])
    assert trainer.global_step == 2 * 4
    assert next(module.parameters()).device.type == "cuda"
    assert "val/loss" in trainer.callback_metrics
    print(f"{name}: ops without a deterministic kernel: {ops or 'none'}")
    assert not torch.are_deterministic_algorithms_enabled()  # put back after the fit


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("compile", [False, True])
def test_mixed_precision_and_compiled_training_on_cuda(precision, compile):
    data = random_data([3, 32, 32])
    hp = TrainParams(
        max_epochs=2, batch_size=32, accelerator="cuda", precision=precision, compile=compile
    )
    module, trainer = fit(hp, ModelParams(channels=8), data, [NoSyncInSteps()])
    assert trainer.precision == precision and trainer.global_step == 2 * 4
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert trainer.callback_metrics["train/samples_per_s"] > 0
    assert next(module.net.parameters()).dtype == torch.float32  # autocast, float32 weights


@pytest.mark.parametrize("where", ["auto", "host"])
def test_data_on_the_gpu_or_streamed_from_pinned_memory(where):
    data = random_data([3, 32, 32])
    hp = TrainParams(max_epochs=2, batch_size=32, accelerator="cuda", data_placement=where)
    _, trainer = fit(hp, ModelParams(channels=8), data, [NoSyncInSteps()])
    expected = "device" if where == "auto" else "host"  # a few kB: far below half the GPU
    assert trainer.datamodule.placement == expected
    assert trainer.global_step == 2 * 4


@pytest.mark.parametrize("where", ["auto", "disk"])
def test_memory_mapped_splits_go_to_the_gpu_or_are_streamed_from_the_mapped_file(where, tmp_path):
    """Splits that load_prepared memory-mapped from disk: moved to the GPU when they fit
    there (auto), or gathered from the mapped file into pinned memory a batch at a time and
    copied while the step runs (disk): no step waits for the device."""
    from pipeline.data.loader import load_prepared
    from pipeline.io import write_json

    data = random_data([3, 32, 32])
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, table in data.tables.items():
        table.to_parquet(prepared / f"{split}.parquet", index=False)
    write_json(prepared / "manifest.json", data.manifest.to_dict())
    mapped = load_prepared(prepared, ("train", "val"), "disk", tmp_path / "mapped")
    assert mapped.storage == "disk"
    hp = TrainParams(max_epochs=2, batch_size=32, accelerator="cuda", data_placement=where)
    _, trainer = fit(hp, ModelParams(channels=8), mapped, [NoSyncInSteps()])
    assert trainer.datamodule.placement == ("device" if where == "auto" else "disk")
    assert trainer.datamodule.pinned() == (where == "disk")
    assert trainer.global_step == 2 * 4
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
