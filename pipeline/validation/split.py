"""Deterministic train/val/test assignment by hash of ``sample_id``.

Each sample's split depends on its id alone (a salted SHA-256 mapped to [0, 1) and cut at the
configured fractions), so a sample keeps its split when new data arrives and the test set
stays comparable across data versions. Because the hash is independent of the label, every
class is divided in the configured proportions (up to sampling noise, which the suite bounds
by requiring every class in every split).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from pipeline.config import SplitParams
from pipeline.data.table import SPLITS

_SALT = b"runway-split:"


def unit_interval(sample_ids: pd.Series) -> np.ndarray:
    """Map each id to a number in [0, 1), uniform over ids."""
    return np.array(
        [int(hashlib.sha256(_SALT + s.encode()).hexdigest()[:13], 16) / 16**13 for s in sample_ids]
    )


def assign_splits(sample_ids: pd.Series, fractions: SplitParams) -> np.ndarray:
    """The split name of each sample: train below f_train, val below f_train + f_val, else test."""
    u = unit_interval(sample_ids)
    cuts = np.cumsum([fractions.train, fractions.val])
    return np.array(SPLITS, dtype=object)[np.searchsorted(cuts, u, side="right")]
