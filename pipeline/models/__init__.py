"""Networks and the LightningModule that trains them.

``MODELS`` maps ``model.name`` to a builder ``(image_shape, n_classes, pixel_range, channels,
dropout) -> nn.Module``; :func:`model_spec` is what ``models/model.json`` records so that
:func:`build_net` can rebuild the same network to load its weights.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.models.cnn import build_cnn
from pipeline.models.mlp import build_mlp
from pipeline.models.resnet import build_resnet18

MODELS = {"cnn": build_cnn, "resnet18": build_resnet18, "mlp": build_mlp}
# The layout of each network's layers, recorded in model.json: raised when a builder changes
# the layers, so that weights trained by another layout are refused by name (cnn 2: pooled
# before the first full-width block).
ARCHITECTURE_VERSIONS = {"cnn": 2, "resnet18": 1, "mlp": 1}
IMAGE_MODELS = ("cnn", "resnet18")

# Where train writes the model and evaluate/register read it.
MODELS_DIR = Path("models")


def incompatibility(name: str, image_shape: list[int], source: str) -> str | None:
    """Why model ``name`` cannot take this data, or None when it can."""
    if name in IMAGE_MODELS and len(image_shape) != 3:
        return (
            f"model {name!r} needs images (channels × height × width) but data source "
            f"{source!r} gives {image_shape[0]} features per sample; use model.name: mlp"
        )
    if name in IMAGE_MODELS and min(image_shape[1:]) < 2:
        return f"model {name!r} needs images of at least 2×2 pixels, got {image_shape}"
    return None


def class_names(manifest) -> list[str]:
    """The name of each output, in output order: what identifies a class across data versions
    (an index may mean another class after a class folder is added or renamed)."""
    return manifest.names


def model_spec(name: str, manifest, channels: int, dropout: float) -> dict:
    """Everything needed to rebuild the network (weights come from the state dict)."""
    return {
        "architecture": name,
        "architecture_version": ARCHITECTURE_VERSIONS[name],
        "image_shape": manifest.image_shape,
        "n_classes": len(manifest.classes),
        "classes": manifest.classes,
        "class_names": class_names(manifest),
        "pixel_range": manifest.pixel_range,
        "channels": channels,
        "dropout": dropout,
    }


def build_net(spec: dict):
    return MODELS[spec["architecture"]](
        spec["image_shape"],
        spec["n_classes"],
        spec["pixel_range"],
        channels=spec["channels"],
        dropout=spec["dropout"],
    )
