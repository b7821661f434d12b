"""scikit-learn's bundled handwritten digits: 1,797 grey 8×8 images, pixels 0–16, 10 classes."""

from __future__ import annotations

import pandas as pd

from pipeline.data.table import make_table

IMAGE_SHAPE = [1, 8, 8]
PIXEL_RANGE = [0.0, 16.0]
CLASSES = list(range(10))


def load() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return make_table(digits.data, digits.target)
