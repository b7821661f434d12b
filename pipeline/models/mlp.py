"""A multi-layer perceptron for tabular features (and, flattened, for images)."""

from __future__ import annotations

import math

from torch import nn

from pipeline.models.cnn import Scale

WIDTH_PER_CHANNEL = 4  # hidden units per layer = 4 × model.channels


def build_mlp(
    image_shape: list[int],
    n_classes: int,
    pixel_range: list[float] | None,
    channels: int = 32,
    dropout: float = 0.2,
) -> nn.Sequential:
    """Scale (pixel range, or per-feature standardisation fitted on train), flatten, two
    hidden ReLU layers of ``4 × channels`` units with dropout, then a linear classifier."""
    n_features = math.prod(image_shape)
    width = WIDTH_PER_CHANNEL * channels
    return nn.Sequential(
        nn.Flatten(),
        Scale.for_range(pixel_range, n_features),
        nn.Linear(n_features, width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, n_classes),
    )
