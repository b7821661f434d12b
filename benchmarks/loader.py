"""The in-memory batch loader (``pipeline.data.loader.TensorBatches``) against a fair
PyTorch baseline: a ``DataLoader`` that fetches whole batches, with ``batch_size=None`` over a
``BatchSampler(RandomSampler)``, from a dataset whose ``__getitem__`` takes a list of indices
and indexes the tensors once per batch. No per-sample collate on either side.

One shuffled epoch of batches on the digits (batch 64) and on the MNIST-sized set (batch
128); each measurement is the mean of several epochs, the rounds alternate the two sides, the
ratio (time, ours / reference) is the median of the rounds' ratios.

Goal: ours not slower than the baseline (≤ 1.0×). Both do the same work (a random
permutation and a gather of every sample per epoch); only the Python around it differs.
For information, the per-sample ``DataLoader(TensorDataset)`` with its default collate, which
the slicing loader was written to avoid.
"""

from __future__ import annotations

import time

from benchmarks.common import Context, digits_prepared, interleaved, mnist_sized, ratio_row

GOAL = 1.0


def batch_dataloader(x, y, batch_size: int, seed: int):
    """The fair baseline: whole batches fetched by a list of indices."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

    class Batches(Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, indices: list[int]):
            index = torch.as_tensor(indices)
            return x[index], y[index]

    dataset = Batches()
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, False), batch_size=None)


def per_epoch(loader, epochs: int):
    """A measurement: seconds per epoch of going through ``loader``, over ``epochs`` epochs."""

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(epochs):
            for xb, _ in loader:
                xb.sum()  # touch the batch
        return (time.perf_counter() - start) / epochs

    return measure


def run(ctx: Context) -> list[dict]:
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.loader import TensorBatches

    rows = []
    rounds = max(ctx.reps, 9)
    for name, data, batch_size, epochs in (
        ("digits, 1,257 images, batch 64", ctx.once("digits", digits_prepared), 64, 50),
        ("MNIST-sized, 60,000 images, batch 128", ctx.once("mnist-sized", mnist_sized), 128, 2),
    ):
        x, y = data.tensors["train"]
        ours, ref = interleaved(
            per_epoch(TensorBatches(x, y, batch_size, shuffle=True, seed=0), epochs),
            per_epoch(batch_dataloader(x, y, batch_size, seed=0), epochs),
            rounds,
        )
        rows.append(
            ratio_row(
                f"loader, one shuffled epoch, vs DataLoader of whole batches ({name})",
                ours,
                ref,
                GOAL,
                unit="ms",
                scale=1000,
            )
        )
        if batch_size == 64:
            per_sample = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
            ours, ref = interleaved(
                per_epoch(TensorBatches(x, y, batch_size, shuffle=True, seed=0), epochs),
                per_epoch(per_sample, max(epochs // 10, 1)),
                rounds,
            )
            rows.append(
                ratio_row(
                    f"  (vs per-sample DataLoader(TensorDataset) with collate; {name})",
                    ours,
                    ref,
                    None,
                    unit="ms",
                    scale=1000,
                )
            )
    return rows
