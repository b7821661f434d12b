"""scikit-learn's bundled handwritten digits: 1,797 grey 8×8 images, pixels 0–16, 10 classes."""

from __future__ import annotations

from pipeline.config import DataParams
from pipeline.data.table import make_table

IMAGE_SHAPE = [1, 8, 8]
PIXEL_RANGE = [0.0, 16.0]
CLASSES = list(range(10))


def load(params: DataParams | None = None) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return {
        "table": make_table(digits.data, digits.target),
        "classes": CLASSES,
        "class_names": [str(c) for c in CLASSES],
        "image_shape": IMAGE_SHAPE,
        "pixel_range": PIXEL_RANGE,
    }
