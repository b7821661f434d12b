"""The LightningModule: cross-entropy classification with the configured optimizer."""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric

from pipeline.io import StageError


class NonFiniteLoss(StageError):
    """The loss became NaN or infinite: the run stops rather than train on garbage."""


def scaled_lr(lr: float, optimizer: str, scaling: str, batch: int, reference: int) -> float:
    """``lr`` (the rate at a global batch of ``reference``) for a global batch of ``batch``:
    ``linear`` × batch/reference, ``sqrt`` × √(batch/reference), ``auto`` linear for SGD and
    sqrt for Adam/AdamW, ``none`` as is (``train.lr_scaling``)."""
    if scaling == "auto":
        scaling = "linear" if optimizer == "sgd" else "sqrt"
    ratio = batch / reference
    return lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[scaling]


# Values that are never a parameter, buffer or module (see Classifier.__setattr__).
PLAIN_VALUES = frozenset({str, int, float, bool, type(None)})

# Devices where torch's fused optimizer kernels run (one kernel for all parameters instead of
# a loop over them: about 0.4 ms less per AdamW step for the digits cnn on 2 CPU cores, and
# fewer kernel launches on a GPU).
FUSED_DEVICES = ("cpu", "cuda", "mps")


def build_optimizer(name: str, params: list, lr: float, weight_decay: float, fused: bool = True):
    """``train.optimizer`` over ``params``: ``sgd`` (Nesterov momentum 0.9), ``adam`` or
    ``adamw``; with ``fused``, torch's fused implementation where the parameters' device has
    one (otherwise torch's default)."""
    on = fused and bool(params) and params[0].device.type in FUSED_DEVICES
    fused = {"fused": True} if on else {}
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, **fused
        )
    optimizer = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer(params, lr=lr, weight_decay=weight_decay, **fused)


class LossAndAccuracy(Metric):
    """A torchmetrics metric: the mean loss and the accuracy over the samples seen since the
    last reset, from three running sums (losses, correct predictions, samples) that are
    summed across processes. One update per batch of seven tensor operations, none of which
    waits for the device: MeanMetric and MulticlassAccuracy together took about 165 µs a
    step on 2 CPU cores, against 70 µs (on a GPU each of their operations is also a kernel
    launch). A NaN loss propagates into the mean, which the caller checks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``losses``: each sample's loss; ``logits``: (samples, classes)."""
        self.loss_sum += losses.sum()
        self.correct += (logits.argmax(1) == target).sum()
        self.samples += target.numel()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum / self.samples, self.correct / self.samples


class Classifier(pl.LightningModule):
    """Wraps a network; logs ``train/loss``, ``train/acc``, ``val/loss`` and ``val/acc`` once
    per epoch, all four after validation, with ``step`` = the epoch (0-based) for the loggers.

    Lightning's automatic optimisation (so ``gradient_clip_val`` and
    ``accumulate_grad_batches`` apply). The learning rate is ``lr`` scaled to the global batch
    (``batch_size`` × processes × accumulated batches, see :func:`scaled_lr`), then follows a
    cosine schedule over ``max_epochs``, stepped per epoch. Only parameters that require
    gradients are optimised (a frozen backbone stays as loaded), with torch's fused optimizer
    kernels (see :func:`build_optimizer`). ``augment`` names the image augmentations applied
    to training batches on the device.

    The metrics are torchmetrics accumulated on the device: no step waits for the device. A
    NaN or infinite loss makes the mean loss since the last validation non-finite, which
    raises :class:`NonFiniteLoss` at the next one (once an epoch, but in tuning trials that
    validate inside their epochs). The training metrics' running sums and the random
    number generators' states are part of a checkpoint, so a run resumed mid-epoch goes on as
    if it had not stopped.

    ``compile``: training and validation call ``torch.compile(net.forward)``; the network
    (what is checkpointed and logged) stays a plain module. Each validation also logs
    ``train/samples_per_s``: the samples trained since the epoch's start or the last
    validation over the time they took (waited for once, on a GPU), all processes together."""

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        optimizer: str,
        weight_decay: float,
        max_epochs: int,
        augment: list[str] | tuple[str, ...] = (),
        *,
        batch_size: int = 64,
        lr_batch_size: int = 64,
        lr_scaling: str = "none",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.augment = tuple(augment)
        self.net = net
        # A bound method, not a module: nothing is registered twice in the state dict.
        self.forward_fn = torch.compile(net.forward) if compile else net.forward
        self.lr = lr
        self.batch_size, self.lr_batch_size, self.lr_scaling = batch_size, lr_batch_size, lr_scaling
        self.effective_lr = lr
        # Training since the epoch's start or its last validation: when, samples, seconds
        # (the throughput logged at a validation covers that stretch; rated_samples, its
        # samples).
        self.since: float | None = None
        self.samples, self.train_seconds, self.rated_samples = 0, None, 0
        self.restart = False  # a stretch starts at the next batch (after a check inside an epoch)
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        # Per-sample losses, so the mean is over samples whatever the last batch's size.
        self.train_metrics = LossAndAccuracy()
        self.train_metrics.persistent(True)  # in checkpoints: a mid-epoch resume keeps the sums
        self.val_metrics = LossAndAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def __setattr__(self, name: str, value) -> None:
        """``nn.Module.__setattr__``, without its checks where they cannot change anything:
        Lightning sets an attribute of the module around every hook it calls (about 45 times
        per optimiser step), and each time the module checks whether the value is a
        parameter, buffer or module (isinstance checks through metaclasses: about 60 µs per
        step on 2 CPU cores, 4 % of a small model's step). A str, number or None that
        replaces an attribute in the instance's own dict is none of those, and that name is
        not a parameter, buffer or submodule, which live in their own dicts; so it is set as
        ``nn.Module`` would set it. (Lightning's own result metrics skip the checks the same
        way.)"""
        if type(value) in PLAIN_VALUES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _step(self, x: torch.Tensor, y: torch.Tensor, metrics: LossAndAccuracy) -> torch.Tensor:
        logits = self.forward_fn(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        metrics.update(losses.detach(), logits.detach(), y)
        return losses.mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.augment:
            from pipeline.models.augment import augment

            x = augment(x, self.augment)
        return self._step(x, y, self.train_metrics)

    def on_train_epoch_start(self) -> None:
        self.since, self.samples, self.train_seconds = time.perf_counter(), 0, None
        self.restart = False

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.restart:  # not the time the callbacks took after the check (a pruner's, say)
            self.since, self.restart = time.perf_counter(), False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.samples += len(batch[1])

    def on_validation_epoch_start(self) -> None:
        if self.since is not None and self.train_seconds is None and self.samples:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once per check: the steps are queued
            self.train_seconds = time.perf_counter() - self.since
        self.val_metrics.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(*batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.train_metrics.update_called:
            return
        train_loss, train_acc = self.train_metrics.compute()
        if not torch.isfinite(train_loss):  # at each validation: once an epoch, but in trials
            raise NonFiniteLoss(
                f"training diverged: train/loss is {train_loss.item()} at epoch "
                f"{self.current_epoch + 1} ({self.optimizer_name}, lr {self.effective_lr:g}); "
                "lower the learning rate (train.lr, or tune.search_space.lr) or check the data"
            )
        val_loss, val_acc = self.val_metrics.compute()
        metrics = {
            "train/loss": train_loss,
            "train/acc": train_acc,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "step": float(self.current_epoch),  # the loggers' step: one point per epoch
        }
        if self.train_seconds:
            world = self.trainer.world_size
            metrics["train/samples_per_s"] = self.samples * world / self.train_seconds
            self.rated_samples = self.samples
        # sync_dist: the values are the same in every process of a data-parallel training
        # (torchmetrics' compute() gathers them); Lightning asks for it all the same.
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        self.train_metrics.reset()
        self.val_metrics.reset()
        # Training resumes (a trial may validate inside an epoch: tune.val_check_interval).
        self.samples, self.train_seconds, self.restart = 0, None, True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint["rng_states"] = rng

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng_states", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])  # the current device: the one training uses

    def configure_optimizers(self):
        trainer = self.trainer
        batch = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self.effective_lr = scaled_lr(
            self.lr, self.optimizer_name, self.lr_scaling, batch, self.lr_batch_size
        )
        params = [p for p in self.net.parameters() if p.requires_grad]
        # Lightning cannot clip the gradients of a fused optimizer under mixed precision (the
        # optimizer unscales them itself, inside its step).
        fused = not (trainer.gradient_clip_val and "mixed" in str(trainer.precision))
        opt = build_optimizer(
            self.optimizer_name, params, self.effective_lr, self.weight_decay, fused
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
