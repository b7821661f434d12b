"""A small CNN for small images (8×8 digits up to 32×32 and beyond), any channel count.

Every network here starts with a :class:`Scale` layer that maps inputs as stored (raw pixels,
or raw tabular features) to a standard range, so a logged model takes data exactly as it is
stored and served.
"""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """``(x - low) / span`` in float32, with ``low`` and ``span`` stored as buffers (exported
    with the model). Scalars for pixels with a known range; one value per feature for tabular
    data, fitted on the training split with :meth:`fit` (mean and standard deviation)."""

    def __init__(self, low: float | torch.Tensor, span: float | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32).clone())
        self.register_buffer("span", torch.as_tensor(span, dtype=torch.float32).clone())

    @classmethod
    def for_range(cls, pixel_range: list[float] | None, n_features: int) -> Scale:
        if pixel_range is None:  # per-feature, fitted later
            return cls(torch.zeros(n_features), torch.ones(n_features))
        low, high = pixel_range
        return cls(low, high - low)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Standardise per feature: mean and standard deviation of ``x`` (N × features)."""
        x = x.reshape(len(x), -1).to(torch.float64)
        std = x.std(dim=0)
        self.low.copy_(x.mean(dim=0).reshape(self.low.shape))
        self.span.copy_(torch.where(std > 1e-12, std, 1.0).reshape(self.span.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.low) / self.span


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


# Inputs at least this many pixels high and wide are pooled after the first conv layer: the
# costly 3×3 layers run at half resolution or less (MNIST, CIFAR), as in the classic small
# MNIST networks; smaller inputs (the 8×8 digits) keep two layers at full resolution.
EARLY_POOL = 16


def build_cnn(
    image_shape: list[int],
    n_classes: int,
    pixel_range: list[float] | None,
    channels: int = 32,
    dropout: float = 0.2,
) -> nn.Sequential:
    """Two conv stages (the second at half resolution and twice the channels), pooled to
    2×2, then dropout and a linear classifier. Works for any C×H×W with H, W ≥ 2.

    Below :data:`EARLY_POOL` pixels each stage is two 3×3 conv layers; from it on, the first
    stage's layers are split by a 2×2 max-pool and the stage ends with another, so a 28×28
    image costs 4.7 M multiply-adds per forward pass at 32 channels instead of 18 M."""
    if pixel_range is None:
        raise ValueError("a CNN needs images with a known pixel range")
    in_channels = image_shape[0]
    early = min(image_shape[1:]) >= EARLY_POOL
    return nn.Sequential(
        Scale.for_range(pixel_range, in_channels),
        *_block(in_channels, channels),
        *([nn.MaxPool2d(2)] if early else []),
        *_block(channels, channels),
        nn.MaxPool2d(2),
        *_block(channels, 2 * channels),
        *_block(2 * channels, 2 * channels),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * channels * 4, n_classes),
    )
