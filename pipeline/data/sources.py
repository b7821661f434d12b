"""Registry of data sources: name → how to read it and what its samples look like."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from pipeline.data import digits


@dataclass(frozen=True)
class Source:
    load: Callable[[], pd.DataFrame]
    image_shape: list[int]
    pixel_range: list[float]
    classes: list[int]
    class_names: list[str]


SOURCES: dict[str, Source] = {
    "digits": Source(
        load=digits.load,
        image_shape=digits.IMAGE_SHAPE,
        pixel_range=digits.PIXEL_RANGE,
        classes=digits.CLASSES,
        class_names=[str(c) for c in digits.CLASSES],
    ),
}
