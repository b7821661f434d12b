"""The LightningModule: cross-entropy classification with the configured optimizer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.io import StageError


class NonFiniteLoss(StageError):
    """The loss became NaN or infinite: the run stops rather than train on garbage."""


class Classifier(pl.LightningModule):
    """Wraps a network; logs ``train/loss``, ``train/acc``, ``val/loss`` and ``val/acc`` per
    epoch. The learning rate follows a cosine schedule over ``max_epochs``. Only parameters
    that require gradients are optimised (a frozen backbone stays as loaded). ``augment``
    names the image augmentations applied to training batches on the device."""

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        optimizer: str,
        weight_decay: float,
        max_epochs: int,
        augment: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.augment = tuple(augment)
        self.net = net
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self._sums: dict[str, torch.Tensor] = {}
        # One optimiser step per batch, written out: Lightning's automatic optimisation wraps
        # each step in a closure and a dozen hooks, which costs more than a small CNN's step.
        self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        """Loss of one batch; the epoch's loss and accuracy are summed on the device and
        logged once per epoch, train and val together after validation: two ``self.log``
        calls per batch cost more than a small model's batch, and every logger call is a
        round trip to the tracking store."""
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        sums = self._sums.setdefault(stage, torch.zeros(3, device=loss.device))
        sums[0] += loss.detach() * len(y)
        sums[1] += (logits.argmax(dim=1) == y).sum()
        sums[2] += len(y)
        return loss

    def _log_epoch(self, stage: str) -> None:
        sums = self._sums.pop(stage, None)
        if sums is not None:
            total, correct, n = sums
            self.log(f"{stage}/loss", total / n, on_step=False, on_epoch=True)
            self.log(f"{stage}/acc", correct / n, on_step=False, on_epoch=True)

    def on_train_epoch_start(self) -> None:
        self._sums = {}

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.augment:
            from pipeline.models.augment import augment

            x, y = batch
            batch = (augment(x, self.augment), y)
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):  # stop at the first bad step instead of training on NaN
            raise NonFiniteLoss(
                f"training diverged: train/loss is {loss.item()} at epoch "
                f"{self.current_epoch + 1}, batch {batch_idx + 1} ({self.optimizer_name}, "
                f"lr {self.lr:g}); lower the learning rate (train.lr, or "
                "tune.search_space.lr) or check the data"
            )
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        if batch_idx + 1 == self.trainer.num_training_batches:
            self.lr_schedulers().step()
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("train")
        self._log_epoch("val")

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs)
        return {"optimizer": opt, "lr_scheduler": schedule}
