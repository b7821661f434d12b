"""A classical baseline on the same splits: an RBF SVC with C and gamma chosen on val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.table import ID_COLUMN, LABEL_COLUMN, PREPARED_DIR, features_of
from pipeline.io import StageError


def _split(split: str, prepared_dir: Path) -> pd.DataFrame:
    path = prepared_dir / f"{split}.parquet"
    if not path.is_file():
        raise StageError(
            f"{path} not found: run the pipeline first (`dvc repro`; `dvc repro validate` "
            "makes the data alone)"
        )
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StageError(
            f"{path}: not a readable table ({first}): `dvc repro validate` writes it again"
        ) from None


def _xy(split: str, prepared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    table = _split(split, prepared_dir)
    return table[features_of(table)].to_numpy(np.float64), table[LABEL_COLUMN].to_numpy()


def svc_baseline(
    c_grid: list[float],
    gamma_grid: list,
    prepared_dir: Path = PREPARED_DIR,
    train_samples: int | None = None,
    seed: int = 0,
) -> dict:
    """Fit on train (or ``train_samples`` of it, drawn with ``seed``) for each (C, gamma),
    keep the best on val, score it on test."""
    from sklearn.svm import SVC

    x_train, y_train = _xy("train", prepared_dir)
    if train_samples is not None and train_samples < len(y_train):
        keep = np.random.default_rng(seed).choice(len(y_train), train_samples, replace=False)
        x_train, y_train = x_train[keep], y_train[keep]
    x_val, y_val = _xy("val", prepared_dir)
    x_test, y_test = _xy("test", prepared_dir)
    best = None
    for c in c_grid:
        for gamma in gamma_grid:
            model = SVC(C=c, gamma=gamma, kernel="rbf").fit(x_train, y_train)
            acc = float((model.predict(x_val) == y_val).mean())
            if best is None or acc > best[0]:
                best = (acc, c, gamma, model)
    acc, c, gamma, model = best
    return {
        "C": c,
        "gamma": gamma,
        "val_accuracy": acc,
        "test_accuracy": float((model.predict(x_test) == y_test).mean()),
        "train_rows": len(y_train),
        "test_rows": len(y_test),
    }


def same_test_set(predictions_csv: Path, prepared_dir: Path = PREPARED_DIR) -> bool:
    """Whether the evaluate stage's predictions cover exactly today's test samples (so its
    accuracy and the baseline's are on the same samples)."""
    try:
        scored = pd.read_csv(predictions_csv, usecols=[ID_COLUMN])[ID_COLUMN]
    except (OSError, ValueError):
        return False
    today = _split("test", prepared_dir)[ID_COLUMN]
    return len(scored) == len(today) and set(scored) == set(today)
