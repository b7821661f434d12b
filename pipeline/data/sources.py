"""Registry of data sources: ``data.source`` → the function that reads it.

Each loader takes the ``data`` params and returns the canonical table (see
:mod:`pipeline.data.table`) as ``table``, or as ``tables``, an iterable of row chunks that
ingest writes as they come (an image folder, which may not fit in memory decoded), with what
the manifest records about it: ``classes``,
``class_names``, ``image_shape``, ``pixel_range`` and optionally ``feature_names`` and
``files`` (each source file with its checksum). Only ingest calls these; every later stage
sees the same table whatever the source.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import DataParams
from pipeline.data import cifar, digits, idx, image_folder, tabular

SOURCES: dict[str, Callable[[DataParams], dict]] = {
    "digits": digits.load,
    "mnist": idx.load,
    "fashion-mnist": idx.load,
    "cifar10": cifar.load,
    "image_folder": image_folder.load,
    "csv": tabular.load,
}
