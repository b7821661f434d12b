"""The model and one Lightning fit: seeding, automatic optimisation, metrics, the Trainer's
options and what a fit leaves behind in the process."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch

from benchmarks.stages import STAGES
from pipeline.config import ModelParams, TrainParams, parse_params
from pipeline.models.cnn import build_cnn
from pipeline.stages.train import merged_params
from pipeline.training import (
    MetricHistory,
    NoOpProfiler,
    fit,
    fit_environment,
    set_seeds,
    trainer_options,
)


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 32, 32]])
def test_cnn_takes_raw_pixels_of_any_small_size(shape):
    net = build_cnn(shape, 10, [0.0, 255.0], channels=8, dropout=0.1).eval()
    out = net(torch.full((4, *shape), 255.0))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.slow  # trains a model for several seconds
def test_training_is_seeded_and_learns(digits_prepared):
    hp = TrainParams(max_epochs=3, batch_size=32, accelerator="cpu")
    model = ModelParams(channels=8)
    first, _ = fit(hp, model, digits_prepared, [])
    second, _ = fit(hp, model, digits_prepared, [])
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x, y = digits_prepared.tensors["val"]
    first.eval()
    with torch.no_grad():
        accuracy = (first(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # three epochs already far above chance (0.1)


def test_best_params_override_train_and_model_sections(tmp_path):
    best = tmp_path / "best_params.json"
    best.write_text(
        '{"train.lr": 0.01, "train.optimizer": "sgd", "model.channels": 16, "model.name": "mlp"}'
    )
    params = parse_params({"train": {"lr": 0.001}})
    hp, model = merged_params(params, best)
    assert (hp.lr, hp.optimizer, hp.max_epochs) == (0.01, "sgd", TrainParams().max_epochs)
    assert (model.name, model.channels, model.dropout) == ("mlp", 16, ModelParams().dropout)
    assert merged_params(params, tmp_path / "absent.json")[0].lr == 0.001
    best.write_text('{"learning_rate": 0.01}')
    with pytest.raises(Exception, match="learning_rate"):
        merged_params(params, best)
    best.write_text('{"model.name": "vgg"}')
    with pytest.raises(Exception, match="model.name: 'vgg' is not allowed"):
        merged_params(params, best)


@pytest.mark.slow  # trains a model for several seconds
def test_automatic_optimisation_accumulates_clips_and_follows_the_cosine_schedule(
    digits_prepared,
):
    import math

    import lightning.pytorch as pl

    class Watch(pl.Callback):
        """The learning rate of each epoch and the largest gradient norm after clipping."""

        def __init__(self) -> None:
            self.lrs, self.norm = [], 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            # The gradients of the last optimizer step, as it used them.
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
                self.norm = max(self.norm, norm)

    batches = math.ceil(len(digits_prepared.tensors["train"][0]) / 64)
    base = TrainParams(max_epochs=3, batch_size=64, accelerator="cpu")
    hp = base.model_copy(update={"accumulate_grad_batches": 3, "gradient_clip_val": 0.05})
    watch = Watch()
    module, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [watch])
    assert module.automatic_optimization
    assert trainer.global_step == 3 * math.ceil(batches / 3)  # one step per 3 batches
    assert watch.norm <= 0.05 * (1 + 1e-4)  # every step's gradients clipped
    # Three batches of 64 per step: train.lr (at 64) scaled by sqrt(3) for AdamW.
    lr = base.lr * math.sqrt(3)
    assert module.effective_lr == pytest.approx(lr)
    assert watch.lrs == pytest.approx([lr * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])

    unclipped = Watch()
    _, trainer = fit(base, ModelParams(channels=8), digits_prepared, [unclipped])
    assert trainer.global_step == 3 * batches
    assert unclipped.norm > 0.05


@pytest.mark.slow  # trains a model for several seconds
def test_epoch_metrics_are_torchmetrics_logged_once_per_epoch(digits_prepared):
    from torchmetrics import Metric

    logged = []

    import lightning.pytorch.loggers as loggers

    class ListLogger(loggers.Logger):
        """Every ``log_metrics`` call Lightning makes."""

        name, version = "list", "0"

        def log_metrics(self, metrics, step=None):
            logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    history = MetricHistory()
    hp = TrainParams(max_epochs=3, batch_size=64, accelerator="cpu")
    module, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [history], ListLogger())
    assert isinstance(module.train_metrics, Metric)
    # One call per epoch with all four metrics and the throughput, at step = epoch.
    assert [step for step, _ in logged] == [0, 1, 2]
    names = {"train/loss", "train/acc", "val/loss", "val/acc", "train/samples_per_s"}
    assert all(set(m) == names for _, m in logged)
    assert module.rated_samples == len(digits_prepared.tables["train"])  # the last epoch's
    assert all(m["train/samples_per_s"] > 0 for _, m in logged)
    assert history.history == [m for _, m in logged]
    # val/acc is the plain accuracy of the model as it ended the last epoch.
    x, y = digits_prepared.tensors["val"]
    module.eval()
    with torch.no_grad():
        logits = module(x)
    assert logged[-1][1]["val/acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert logged[-1][1]["val/loss"] == pytest.approx(loss, rel=1e-5)


class InSteps(pl.Callback):
    """``inside`` is true from each training batch's start to its end: what a test counts
    during the training steps."""

    def __init__(self) -> None:
        self.inside = False

    def on_train_batch_start(self, *args) -> None:
        self.inside = True

    def on_train_batch_end(self, *args) -> None:
        self.inside = False


def test_training_steps_never_wait_for_the_device(digits_prepared, monkeypatch):
    """No tensor is read back to the host during a training step (on a GPU each read is a
    sync): counted on the CPU as calls of item/bool/float/int/tolist/numpy/cpu. torch's
    optimisers read their step counters, which live on the host."""
    import traceback

    reads, steps = [], InSteps()
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if steps.inside:
                caller = traceback.extract_stack(limit=2)[0].filename
                if "torch/optim/" not in caller:
                    reads.append((_name, caller))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    hp = TrainParams(max_epochs=2, batch_size=64, accelerator="cpu", gradient_clip_val=1.0)
    _, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [steps])
    assert trainer.global_step == 2 * 20
    assert reads == []


def test_the_hooks_lightning_calls_each_step_skip_setattr_checks_and_profiler_contexts(
    digits_prepared, monkeypatch
):
    """Around every hook it calls (about 60 a step) Lightning sets an attribute of the module
    and enters its profiler's ``profile()``. A str, number or None replacing an attribute is
    set without ``nn.Module``'s parameter/buffer/module checks, and ``profile()`` hands out
    one shared no-op context instead of starting and stopping the default profiler. Counted
    during the training steps: ``nn.Module.__setattr__`` on the module and the default
    profiler's ``start`` (each about 1,800 calls here without the shortcuts)."""
    from lightning.pytorch.profilers import PassThroughProfiler

    from pipeline.models.module import Classifier

    calls, starts, steps = [], [], InSteps()
    original, start = torch.nn.Module.__setattr__, PassThroughProfiler.start

    def counted(self, name, value):
        if steps.inside and isinstance(self, Classifier):
            calls.append(name)
        original(self, name, value)

    def started(self, action_name):
        if steps.inside:
            starts.append(action_name)
        start(self, action_name)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counted)
    monkeypatch.setattr(PassThroughProfiler, "start", started)

    hp = TrainParams(max_epochs=2, batch_size=64, accelerator="cpu")
    _, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [steps])
    assert trainer.global_step == 2 * 20
    assert calls == [] and starts == []
    profiler = trainer.profiler
    assert isinstance(profiler, NoOpProfiler)
    with profiler.profile("outer"), profiler.profile("inner"):  # nested, as hooks are
        pass


def test_the_module_registers_parameters_buffers_and_submodules_as_nn_module_does():
    from pipeline.models.module import Classifier

    net = build_cnn([1, 8, 8], 10, [0.0, 16.0], channels=8, dropout=0.1)
    module = Classifier(net, 0.01, "adamw", 0.0, 2)
    module.note = "plain"
    module.note = None  # an attribute: set directly
    assert module.note is None and "note" not in dict(module.named_children())
    module.note = torch.nn.Linear(2, 2)  # an attribute replaced by a module: registered
    assert dict(module.named_children())["note"] is module.note
    module.scale = torch.nn.Parameter(torch.ones(1))
    assert "scale" in dict(module.named_parameters())
    with pytest.raises(TypeError, match="cannot assign 'str' as parameter 'scale'"):
        module.scale = "x"
    module.scale = None  # a parameter set to None stays registered, as None
    assert module.scale is None and "scale" not in dict(module.named_parameters())
    module.register_buffer("counts", torch.zeros(3))
    module.counts = None
    assert module.counts is None and "counts" not in dict(module.named_buffers())
    module.lr = 0.5
    assert module.lr == 0.5


def test_a_diverging_run_stops_at_the_end_of_the_epoch_with_a_clear_error(digits_prepared):
    from pipeline.models.module import NonFiniteLoss

    hp = TrainParams(max_epochs=3, lr=1e6, optimizer="sgd", accelerator="cpu")
    history = MetricHistory()
    with pytest.raises(NonFiniteLoss) as error:
        fit(hp, ModelParams(channels=8), digits_prepared, [history])
    message = str(error.value)
    assert message.startswith("training diverged: train/loss is nan at epoch 1 (sgd, lr 1e+06)")
    assert "lower the learning rate" in message
    assert history.history == []  # nothing logged for the diverged epoch


def test_trainer_options_for_a_cuda_run_are_what_the_params_say():
    hp = TrainParams(accelerator="cuda", gradient_clip_val=1.5, accumulate_grad_batches=4)
    options = trainer_options(hp)
    assert options["accelerator"] == "cuda" and options["devices"] == 1
    assert options["deterministic"] == "warn"  # the default: no error for a missing kernel
    assert (options["gradient_clip_val"], options["accumulate_grad_batches"]) == (1.5, 4)
    assert not options["enable_progress_bar"] and not options["enable_model_summary"]
    assert isinstance(options["profiler"], NoOpProfiler)
    assert not options["enable_checkpointing"] and trainer_options(hp, True)["enable_checkpointing"]
    assert trainer_options(hp.model_copy(update={"deterministic": True}))["deterministic"] is True
    assert trainer_options(hp.model_copy(update={"deterministic": False}))["deterministic"] is False
    # Deterministic cuBLAS only where it means something: CUDA, determinism asked for.
    for deterministic, cublas in (("warn", True), (True, True), (False, False)):
        env = fit_environment(hp.model_copy(update={"deterministic": deterministic}))
        assert ("CUBLAS_WORKSPACE_CONFIG" in env) is cublas
    cpu = fit_environment(TrainParams(accelerator="cpu", deterministic=True))
    assert "CUBLAS_WORKSPACE_CONFIG" not in cpu
    assert cpu["PYTORCH_NVML_BASED_CUDA_CHECK"] is None  # lifted during the fit ...
    off = fit_environment(TrainParams(accelerator="cpu"), plain_cuda_check=False)
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in off  # ... unless switched off


def test_the_options_build_a_trainer():
    import lightning.pytorch as pl

    for deterministic in ("warn", True, False):
        hp = TrainParams(accelerator="cpu", deterministic=deterministic, gradient_clip_val=1.0)
        pl.Trainer(**trainer_options(hp), logger=False)
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # trains a model for several seconds
def test_a_fit_puts_back_what_it_changes_in_the_process(digits_prepared, monkeypatch):
    import logging
    import os
    import signal
    import warnings

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    set_seeds(0)
    assert not torch.are_deterministic_algorithms_enabled()  # seeding does not set it
    seen = {}

    import lightning.pytorch as pl

    class During(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
            seen["nvml"] = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")

    before = (
        list(warnings.filters),
        logging.getLogger("lightning.pytorch").level,
        signal.getsignal(signal.SIGTERM),
        signal.getsignal(signal.SIGINT),
    )
    fit(
        TrainParams(max_epochs=1, accelerator="cpu"),
        ModelParams(channels=8),
        digits_prepared,
        [During()],
    )
    assert seen == {"deterministic": True, "nvml": None}
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    after = (
        list(warnings.filters),
        logging.getLogger("lightning.pytorch").level,
        signal.getsignal(signal.SIGTERM),
        signal.getsignal(signal.SIGINT),
    )
    assert after == before
    seen.clear()
    fit(
        TrainParams(max_epochs=1, accelerator="cpu", deterministic=False),
        ModelParams(channels=8),
        digits_prepared,
        [During()],
        plain_cuda_check=False,
    )
    assert seen == {"deterministic": False, "nvml": "1"}


@pytest.mark.slow  # trains a model for several seconds
def test_importing_the_training_modules_changes_nothing_in_the_process():
    import subprocess
    import sys

    code = """
import logging, os, warnings
import lightning.pytorch, torch
def state():
    return (dict(os.environ), list(warnings.filters), torch.are_deterministic_algorithms_enabled(),
            {n: logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")})
before = state()
import pipeline.training, pipeline.models.module, pipeline.stages.train
assert state() == before, [a == b for a, b in zip(state(), before)]
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


# What importing each stage's module loads of the heavy libraries, in a fresh interpreter.
# torch alone takes about 2 s to import on 2 cores, Lightning 3.5 s more: scoring a model
# (evaluate, register) needs torch, not Lightning's training machinery.
STAGE_IMPORTS = {
    "params": [],
    "ingest": [],
    "validate": [],
    "tune": [],
    "train": ["lightning", "torch"],
    "evaluate": ["torch"],
    "register": ["torch"],
}


@pytest.mark.slow  # a fresh interpreter per stage
@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_module_imports_only_the_heavy_libraries_it_needs(stage):
    import subprocess
    import sys

    assert stage in STAGE_IMPORTS, f"say what dvc.yaml's new stage {stage!r} may import"

    heavy = {"torch", "lightning", "pytorch_lightning", "mlflow", "great_expectations", "optuna"}
    code = (
        f"import sys, pipeline.stages.{stage}\n"
        f"print(*sorted({{name.split('.')[0] for name in sys.modules}} & {heavy!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == STAGE_IMPORTS[stage]


def test_no_private_attributes_of_library_objects():
    """Only our own objects' underscore attributes (``self._x``) are used."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = ["pipeline/training.py", "pipeline/models/module.py", "pipeline/stages/train.py"]
    found = []
    for name in files:
        for number, line in enumerate((root / name).read_text().splitlines(), 1):
            for match in re.finditer(r"(\w+)\._[a-z]\w*", line):
                if match[1] != "self":
                    found.append(f"{name}:{number}: {match[0]}")
    assert found == []


@pytest.mark.parametrize(
    ("optimizer", "scaling", "batch", "expected"),
    [
        ("adamw", "auto", 256, 2 * 3e-3),  # sqrt(256 / 64)
        ("adam", "auto", 16, 3e-3 / 2),
        ("sgd", "auto", 256, 4 * 3e-3),  # linear
        ("adamw", "linear", 128, 2 * 3e-3),
        ("sgd", "sqrt", 576, 3 * 3e-3),
        ("sgd", "none", 512, 3e-3),
        ("adamw", "auto", 64, 3e-3),
    ],
)
def test_the_learning_rate_is_scaled_to_the_global_batch(optimizer, scaling, batch, expected):
    from pipeline.models.module import scaled_lr

    assert scaled_lr(3e-3, optimizer, scaling, batch, 64) == pytest.approx(expected)


@pytest.mark.slow  # trains four models for an epoch
def test_optimizers_use_fused_kernels_but_where_mixed_precision_clips(digits_prepared):
    from pipeline.models.module import build_optimizer

    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    for name, kind in kinds.items():
        hp = TrainParams(max_epochs=1, accelerator="cpu", optimizer=name)
        _, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [])
        (optimizer,) = trainer.optimizers
        assert type(optimizer) is kind
        assert optimizer.defaults["fused"] is True
        assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(hp.lr)

    # Lightning cannot clip a fused optimizer's gradients under mixed precision: not fused.
    hp = TrainParams(
        max_epochs=1, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=0.05
    )
    history = MetricHistory()
    _, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [history])
    assert not trainer.optimizers[0].defaults["fused"]
    assert len(history.history) == 1

    # The same update as torch's for-loop implementation.
    torch.manual_seed(0)
    weights, grad = torch.randn(5, 3), torch.randn(5, 3)
    steps = []
    for fused in (True, False):
        param = torch.nn.Parameter(weights.clone())
        optimizer = build_optimizer("adamw", [param], 1e-2, 1e-4, fused=fused)
        for _ in range(3):
            param.grad = grad.clone()
            optimizer.step()
        steps.append(param.detach())
    assert optimizer.defaults["fused"] is None
    torch.testing.assert_close(steps[0], steps[1])
    assert not torch.equal(steps[1], weights)


def test_precision_and_compile_are_params_and_trainer_options():
    hp = TrainParams(accelerator="cpu", precision="bf16-mixed", compile=True)
    assert trainer_options(hp)["precision"] == "bf16-mixed"
    assert trainer_options(TrainParams())["precision"] == "32-true"
    with pytest.raises(ValueError, match="train.precision"):
        parse_params({"train": {"precision": "fp8"}})


def test_16_mixed_on_the_cpu_is_a_params_error(digits_prepared):
    from pipeline.io import StageError

    hp = TrainParams(max_epochs=1, accelerator="cpu", precision="16-mixed")
    with pytest.raises(StageError) as error:
        fit(hp, ModelParams(channels=8), digits_prepared, [])
    assert str(error.value) == (
        "params.yaml: train.precision: 16-mixed needs a CUDA GPU, and this training runs on "
        "cpu; use bf16-mixed or 32-true"
    )


@pytest.mark.slow  # compiles the network (tens of seconds on two cores)
def test_bf16_and_compiled_training_learn_and_keep_a_plain_float32_network(digits_prepared):
    hp = TrainParams(max_epochs=2, accelerator="cpu", precision="bf16-mixed", compile=True)
    history = MetricHistory()
    module, trainer = fit(hp, ModelParams(channels=8), digits_prepared, [history])
    assert trainer.precision == "bf16-mixed"
    assert history.history[-1]["val/acc"] > 0.8
    # The network itself is not compiled: its state dict and outputs are plain float32.
    keys = list(module.state_dict())
    assert not any("_orig_mod" in key or "forward_fn" in key for key in keys)
    assert [k for k in keys if k.startswith("net.")] == [
        f"net.{k}" for k in module.net.state_dict()
    ]
    x = digits_prepared.tensors["val"][0][:4]
    assert module.net.eval()(x).dtype == torch.float32


def test_data_placement_is_chosen_by_size_and_named(digits_prepared):
    from pipeline.training import placement

    cpu = torch.device("cpu")
    assert placement("auto", 80 * 2**20, cpu) == ("device", "80 MB in cpu memory")
    assert placement("host", 3 * 2**20, cpu) == ("host", "3.0 MB, train.data_placement: host")
    with pytest.raises(ValueError, match="train.data_placement"):
        parse_params({"train": {"data_placement": "ssd"}})


@pytest.mark.slow  # trains four times
def test_data_streamed_from_host_memory_or_disk_trains_exactly_as_data_on_the_device(
    digits_prepared, tmp_path
):
    """Placements as asked; splits memory-mapped (by load_prepared) are streamed from disk
    under auto too, on a CPU."""
    from pipeline.data.loader import load_prepared
    from pipeline.io import write_json

    for split in ("train", "val"):
        digits_prepared.tables[split].to_parquet(tmp_path / f"{split}.parquet", index=False)
    write_json(tmp_path / "manifest.json", digits_prepared.manifest.to_dict())
    mapped = load_prepared(tmp_path, ("train", "val"), "disk", mapped_dir=tmp_path / "mapped")
    assert mapped.storage == "disk"
    histories = []
    runs = (
        ("device", digits_prepared, "device"),
        ("host", digits_prepared, "host"),
        ("disk", mapped, "disk"),
        ("auto", mapped, "disk"),
    )
    for asked, data, where in runs:
        hp = TrainParams(max_epochs=2, accelerator="cpu", data_placement=asked)
        history = MetricHistory()
        _, trainer = fit(hp, ModelParams(channels=8), data, [history])
        assert trainer.datamodule.placement == where
        histories.append(
            [{k: v for k, v in h.items() if "samples_per_s" not in k} for h in history.history]
        )
    assert histories[0] == histories[1] == histories[2] == histories[3]


def test_fit_refuses_a_device_this_machine_lacks(digits_prepared):
    """Every training (train stage, trials, data-parallel replicas) passes through fit: a
    device named outright that the machine lacks is one line (Lightning's Trainer would
    raise its own MisconfigurationException)."""
    from pipeline.io import StageError

    hp = TrainParams(max_epochs=1, accelerator="mps")  # never present on Linux
    with pytest.raises(StageError, match=r"^params.yaml: train.accelerator: 'mps' needs an MPS"):
        fit(hp, ModelParams(channels=8), digits_prepared, [])


def test_checks_inside_an_epoch_each_log_the_training_since_the_last(digits_prepared):
    """Four checks an epoch (a trial's tune.val_check_interval: 0.25), 20 batches of 64: one
    every 5 batches, the last at the epoch's end; each logs the train loss and throughput of
    the 5 batches before it (the last 4 × 64 + 36 samples), not of the epoch so far, nor the
    time callbacks take after a check (a pruner asking its database, here 2 s)."""

    class SlowAfterChecks(pl.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            time.sleep(2.0)

    history = MetricHistory()
    hp = TrainParams(max_epochs=1, batch_size=64, accelerator="cpu")
    callbacks = [history, SlowAfterChecks()]
    module, trainer = fit(
        hp, ModelParams(channels=8), digits_prepared, callbacks, checks_per_epoch=4
    )
    assert len(history.history) == 4
    assert trainer.global_step == 20  # every batch trained
    # Each stretch of 320 (or 292) samples trains in about 0.02-0.08 s alone, and in well
    # under a second on a loaded machine (CI has seen 0.3 s): over 250 samples/s. Counting
    # the 2 s sleep would give at most 160.
    assert all(h["train/samples_per_s"] > 250 for h in history.history)
    assert module.rated_samples == 1252 - 15 * 64  # batches 16-20, the last one of 36
    losses = [h["train/loss"] for h in history.history]
    assert losses == sorted(losses, reverse=True)  # later stretches of training fit better


def test_a_checkpoint_is_written_to_its_file_without_a_copy_in_memory(tmp_path, monkeypatch):
    """Checkpoints (weights and optimiser state, every epoch) go straight to a file beside
    their path, moved into place: no serialised copy of them is held in memory on the way
    (Lightning's own writer held one: 194 MB for a checkpoint of 180 MB), and the file
    reads back as it was saved."""
    import tracemalloc

    from pipeline.training import WholeCheckpoints

    weights = torch.arange(8 * 2**20, dtype=torch.float32)  # 32 MB
    checkpoint = {"state_dict": {"w": weights}, "epoch": 3}
    writer, path = WholeCheckpoints(), tmp_path / "last.ckpt"
    path.write_bytes(b"the previous checkpoint")
    tracemalloc.start()
    try:
        writer.save_checkpoint(checkpoint, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MB held while writing"
    loaded = writer.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], weights) and loaded["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    written = path.read_bytes()
    writer.save_checkpoint(checkpoint, path)
    assert path.read_bytes() == written  # the same bytes for the same checkpoint
    with pytest.raises(TypeError):
        writer.save_checkpoint(checkpoint, path, storage_options={"anon": True})
    # A URL's checkpoint goes through fsspec, as Lightning writes it, not to a local folder.
    monkeypatch.chdir(tmp_path)
    writer.save_checkpoint(checkpoint, "memory://checkpoints/last.ckpt")
    loaded = writer.load_checkpoint("memory://checkpoints/last.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], weights) and loaded["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    writer.remove_checkpoint("memory://checkpoints/last.ckpt")
    writer.save_checkpoint(checkpoint, f"file://{tmp_path}/url.ckpt")  # a local file's URL
    writer.save_checkpoint(checkpoint, "sub/relative.ckpt")  # from the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "sub", "url.ckpt"]
    for saved in ("url.ckpt", "sub/relative.ckpt"):
        assert (tmp_path / saved).read_bytes() == written
