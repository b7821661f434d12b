"""The canonical sample table every source is turned into.

One row per sample: ``sample_id`` (a content hash of the features, so the same sample keeps
the same id whatever file it came from), ``label`` (int64) and the features as float32 columns
``px_0 … px_{n-1}`` (pixels in row-major C×H×W order). The manifest beside it records what a
later stage must know: source, row count, checksum, class set, image shape and pixel range.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ID_COLUMN = "sample_id"
LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
SPLITS = ("train", "val", "test")

# Where ingest writes the raw table and validate the prepared splits.
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")


def feature_columns(n_features: int) -> list[str]:
    return [f"px_{i}" for i in range(n_features)]


def content_ids(features: np.ndarray) -> list[str]:
    """A stable id per row: the first 16 hex digits of SHA-256 over its float32 bytes."""
    rows = np.ascontiguousarray(features, dtype=np.float32)
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows]


def make_table(features: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Build the canonical table from an (n, n_features) array and n integer labels."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (samples × features), got shape {features.shape}")
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    table = pd.DataFrame(features, columns=feature_columns(features.shape[1]))
    table.insert(0, LABEL_COLUMN, np.asarray(labels, dtype=np.int64))
    table.insert(0, ID_COLUMN, content_ids(features))
    return table


def features_of(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("px_")]


@dataclass(frozen=True)
class Manifest:
    """What ingest knows about the data it wrote."""

    source: str
    rows: int
    checksum: str
    classes: list[int]
    image_shape: list[int]
    pixel_range: list[float]
    class_names: list[str] = field(default_factory=list)

    @property
    def n_features(self) -> int:
        return int(np.prod(self.image_shape))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(**data)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
