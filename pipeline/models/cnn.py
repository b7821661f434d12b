"""A small CNN for small images (8×8 digits up to 32×32), any channel count.

The network starts with a :class:`Scale` layer that maps raw pixel values to [0, 1], so the
logged model takes pixels exactly as they are stored and served.
"""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """(x - low) / (high - low), with the range stored as buffers (exported with the model)."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(float(low)))
        self.register_buffer("span", torch.tensor(float(high - low)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.low) / self.span


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def build_cnn(
    image_shape: list[int],
    n_classes: int,
    pixel_range: list[float],
    channels: int = 32,
    dropout: float = 0.2,
) -> nn.Sequential:
    """Two conv-conv stages (the second at half resolution and twice the channels), pooled
    to 2×2, then dropout and a linear classifier."""
    in_channels = image_shape[0]
    return nn.Sequential(
        Scale(*pixel_range),
        *_block(in_channels, channels),
        *_block(channels, channels),
        nn.MaxPool2d(2),
        *_block(channels, 2 * channels),
        *_block(2 * channels, 2 * channels),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * channels * 4, n_classes),
    )
