"""The prepared splits as tensors (:func:`load_prepared`), and batches from tensors held in
memory or memory-mapped from disk, one index per batch: no per-sample Dataset or collate.

For data sets that fit in memory this is several times faster than
``DataLoader(TensorDataset(...))``, which indexes and stacks one sample at a time. Imports
torch, never Lightning: the stages that only score a model (evaluate, register) load the
splits from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.mapped import (
    MAPPED_DIR,
    input_dtype,
    input_layout,
    mapped_features,
    storage,
)
from pipeline.data.table import (
    LABEL_COLUMN,
    PREPARED_DIR,
    Manifest,
    features_of,
    read_features,
    with_features,
)
from pipeline.io import read_json, require


class TensorBatches:
    """An iterable of ``(x, y)`` batches over in-memory tensors.

    With ``shuffle=True`` each pass draws a new permutation from a generator seeded with
    ``seed``, so the order is reproducible run to run and differs epoch to epoch, and each
    batch is gathered on its own when it is asked for: no copy of the whole pass, so a pass
    cut short (Lightning's ``limit_train_batches``) costs only its batches, and data moved to
    a GPU never needs room for a second copy. In order (no shuffle, one process) batches are
    views of the tensors. With ``pin`` each batch is copied into page-locked memory, so that
    its copy to a GPU can overlap computation (data kept in host memory).

    It is stateful in Lightning's sense (``state_dict``/``load_state_dict``): the state is the
    generator's and how many batches of the current pass were served, so Lightning saves it in
    a training checkpoint and a resumed pass serves exactly the batches that were left.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
        pin: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, y
        self.rank, self.world = rank, world
        self.pin = pin
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._generator = torch.Generator().manual_seed(seed)
        self._pass_start: torch.Tensor | None = None  # generator state the pass drew from
        self._served = 0  # batches of the current pass handed out
        self._skip = 0  # batches the next pass skips (set by load_state_dict)

    def _per_rank(self) -> int:
        """Samples each rank gets in a pass (``ceil(n / world)``, as DistributedSampler)."""
        return -(-len(self.x) // self.world)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self._per_rank()
        self._pass_start = self._generator.get_state()
        order = None  # in order: slices
        if self.shuffle:
            order = torch.randperm(len(self.x), generator=self._generator).to(self.x.device)
        elif self.world > 1:
            order = torch.arange(len(self.x), device=self.x.device)
        if self.world > 1:
            # One permutation on every rank (same generator); rank r takes every world-th
            # sample from r, the first samples repeated so that every rank has n of them
            # (ranks must run the same number of steps), as torch's DistributedSampler does.
            order = torch.cat([order, order[: n * self.world - len(order)]])[
                self.rank :: self.world
            ]
        skip, self._skip = self._skip, 0
        self._served = skip
        stop = len(self) * self.batch_size
        starts = range(skip * self.batch_size, min(stop, n), self.batch_size)
        for start in starts:
            self._served += 1
            end = start + self.batch_size
            batch = slice(start, end) if order is None else order[start:end]
            x, y = self.x[batch], self.y[batch]
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def state_dict(self) -> dict:
        """Where the batches stand: the generator, and the batches of an unfinished pass."""
        if self._pass_start is not None and self._served < len(self):
            return {"generator": self._pass_start.clone(), "served": self._served}
        return {"generator": self._generator.get_state(), "served": 0}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the next pass is the saved one, minus the served batches."""
        self._generator.set_state(state["generator"])
        self._skip, self._pass_start, self._served = int(state["served"]), None, 0


def to_tensors(
    table: pd.DataFrame, image_shape: list[int], values: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows → raw inputs (N×C×H×W images, or N×F features) and int64 labels.

    uint8 pixels stay uint8 (the model's first layer converts each batch to float32), so
    CIFAR-10 takes 180 MB in memory rather than 740 MB. Scaling happens inside the model, so a
    logged model takes raw values as served. ``values``, the table's features as the writable
    array its frame is a view of (:func:`~pipeline.data.table.read_features`), become the
    inputs without a copy when they have the inputs' dtype and shape: then a write into either
    the table's features or the inputs changes both (nothing writes into them).
    """
    columns = features_of(table)
    dtype = input_dtype(table.dtypes[columns] if columns else [])
    shape = (len(table), len(columns))
    if (
        values is None
        or values.dtype != dtype
        or values.shape != shape
        or not values.flags.c_contiguous
    ):
        values = np.ascontiguousarray(table[columns].to_numpy(dtype=dtype))
        if not values.flags.writeable:  # a view of pandas' read-only block
            values = values.copy()
    x = torch.from_numpy(values).reshape(len(table), *image_shape)
    y = torch.from_numpy(table[LABEL_COLUMN].to_numpy(dtype=np.int64, copy=True))
    return x, y


@dataclass
class Prepared:
    """The validated splits: the manifest, each split's table and its ``(x, y)`` tensors,
    whether the features are in ``memory`` or memory-mapped from ``disk`` (and why), and
    under ``disk`` the file each split's inputs are mapped from."""

    manifest: Manifest
    tables: dict[str, pd.DataFrame]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    storage: str = "memory"
    storage_reason: str = ""
    copies: dict[str, Path] = field(default_factory=dict)


def load_prepared(
    prepared_dir: Path = PREPARED_DIR,
    splits=("train", "val", "test"),
    placement: str = "auto",
    mapped_dir: Path = MAPPED_DIR,
    processes: int = 1,
) -> Prepared:
    """Read the validated splits and their manifest. A split's table and its inputs share
    one copy of the features when they are read as one block (uint8 or float32).

    With ``placement`` (``train.data_placement``) ``disk``, or ``auto`` when the splits'
    inputs, once in each of the ``processes`` that load them at the same time, take more
    than ``HOST_SHARE`` of the host's available memory, that copy is a
    memory-mapped file under ``mapped_dir`` (:func:`mapped_features`): the operating system
    reads the pages a batch needs and can drop them again, so the splits need not fit in
    memory."""
    manifest = Manifest.from_dict(read_json(require(prepared_dir / "manifest.json", "validate")))
    paths = {split: require(prepared_dir / f"{split}.parquet", "validate") for split in splits}
    layouts = {split: input_layout(path) for split, path in paths.items()}
    nbytes = sum(layout.nbytes for layout in layouts.values())
    where, why = storage(placement, nbytes, processes=processes)
    tables, tensors, copies = {}, {}, {}
    for split, path in paths.items():
        layout = layouts.pop(split)  # its footer, once read: about 30 MB for 12,288 columns
        if where == "disk":
            front, values, features = mapped_features(path, mapped_dir / split, layout)
            copies[split] = Path(values.filename)
        else:
            front, values, features = read_features(path, parquet=layout.parquet)
        layout.parquet.close()
        del layout
        tables[split] = front if values is None else with_features(front, values, features)
        tensors[split] = to_tensors(tables[split], manifest.image_shape, values)
    return Prepared(manifest, tables, tensors, where, why, copies)
