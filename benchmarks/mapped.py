"""Splits larger than memory: a set's train and val splits (the image folder, in scale's
scratch project after its gate) loaded for training as ``load_prepared`` loads them,
memory-mapped from disk (``train.data_placement: disk``) and read into memory (``host``),
each load in a process of its own (``python -m benchmarks.mapped <placement>``).

- Memory: the anonymous memory (resident and not file-backed) the load adds. The mapped
  pixels are file pages, which the system can drop and read again, so they are not counted.
  Goal: the mapped load within ``MEMORY_GOAL`` × the in-memory one.
- Speed: one shuffled pass of batch-128 gathers from the mapped inputs and from the inputs in
  memory, in one process, rounds alternating, the file's pages in the page cache (as they are
  from the second epoch on when the splits fit it). Goal: within ``SPEED_GOAL``.
- For information: the first mapped load, which makes the ``.npy`` files, and a later one.
- For information: validate on the set's raw table (``python -m benchmarks.mapped validate
  <placement>``: read, checked and written to a scratch folder), memory-mapped and in
  memory: the anonymous memory at its peak (sampled every 5 ms) and the wall time. What a
  mapped validate holds at its peak is the prepared write's row group, not the data.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.common import interleaved, ratio_row, result, timed

MEMORY_GOAL = 0.5
SPEED_GOAL = 1.10
ROUNDS = 5


def anonymous_bytes() -> int:
    import psutil

    info = psutil.Process().memory_info()
    return info.rss - info.shared  # Linux: RssAnon (shared is RssFile + RssShmem)


class AnonymousPeak:
    """The most anonymous memory seen while entered, sampled every 5 ms by a thread."""

    def __enter__(self) -> AnonymousPeak:
        import threading

        self.top, self.done = anonymous_bytes(), False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done:
            self.top = max(self.top, anonymous_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.done = True
        self.thread.join()


def validate_raw(placement: str) -> dict:
    """Validate the project's raw table with its features in memory or memory-mapped, the
    prepared splits written to a scratch folder."""
    import tempfile

    from pipeline.config import load_params
    from pipeline.data.mapped import take_rows
    from pipeline.stages.validate import read_raw, validate, write_prepared

    params = load_params("validate")
    before = anonymous_bytes()
    # In the project copy, under the bench's scratch folder: removed with it when stopped.
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as scratch, AnonymousPeak() as peak:
        start = time.perf_counter()
        table, manifest, mapped = read_raw(placement=placement)
        take = take_rows if mapped else None
        kept, _, summary = validate(table, manifest, params, Path(scratch) / "docs", take)
        write_prepared(kept, manifest, Path(scratch) / "prepared")
        wall = time.perf_counter() - start
    assert summary["success"], summary["failures"]
    return {"mapped": bool(mapped), "wall_s": wall, "peak_mb": (peak.top - before) / 2**20}


def one_pass(x, y):
    from pipeline.data.loader import TensorBatches

    def measure() -> float:
        start = time.perf_counter()
        for xb, _ in TensorBatches(x, y, 128, shuffle=True, seed=0):
            xb.sum()  # touch the batch
        return time.perf_counter() - start

    return measure


def measure(placement: str, compare: bool) -> dict:
    """Load the splits with ``placement`` in this process; with ``compare``, time passes
    over them against passes over an in-memory load."""
    from pipeline.data.loader import load_prepared

    before = anonymous_bytes()
    start = time.perf_counter()
    data = load_prepared(splits=("train", "val"), placement=placement)
    found = {
        "storage": data.storage,
        "load_s": time.perf_counter() - start,
        "anonymous_mb": (anonymous_bytes() - before) / 2**20,
    }
    if compare:
        memory = load_prepared(splits=("train", "val"), placement="host")
        found["passes"] = interleaved(
            one_pass(*data.tensors["train"]), one_pass(*memory.tensors["train"]), ROUNDS
        )
    return found


def child(project: Path, *args: str) -> dict:
    _, text = timed([sys.executable, "-m", "benchmarks.mapped", *args], project)
    return json.loads(text.strip().splitlines()[-1])


def rows(project: Path, label: str) -> list[dict]:
    """The rows for the data prepared in ``project``; its mapped files are made afresh."""
    import shutil

    from pipeline.data.mapped import MAPPED_DIR

    shutil.rmtree(project / MAPPED_DIR, ignore_errors=True)
    memory = child(project, "host")
    made = child(project, "disk")
    mapped = child(project, "disk", "compare")
    checked = {p: child(project, "validate", p) for p in ("memory", "disk")}
    assert [checked[p]["mapped"] for p in checked] == [False, True]
    assert (memory["storage"], made["storage"], mapped["storage"]) == ("memory", "disk", "disk")
    ratio = mapped["anonymous_mb"] / memory["anonymous_mb"]
    print(
        f"  splits loaded in memory {memory['load_s']:.1f} s, +{memory['anonymous_mb']:.0f} MB; "
        f"memory-mapped {made['load_s']:.1f} s (files made), {mapped['load_s']:.1f} s, "
        f"+{mapped['anonymous_mb']:.0f} MB; validate in memory "
        f"{checked['memory']['wall_s']:.1f} s, +{checked['memory']['peak_mb']:.0f} MB at the "
        f"peak; memory-mapped {checked['disk']['wall_s']:.1f} s, "
        f"+{checked['disk']['peak_mb']:.0f} MB",
        flush=True,
    )
    peak = checked["disk"]["peak_mb"] / checked["memory"]["peak_mb"]
    return [
        result(
            f"{label}: train + val loaded for training, memory-mapped from disk / in memory: "
            "anonymous memory added",
            round(mapped["anonymous_mb"]),
            round(memory["anonymous_mb"]),
            round(ratio, 2),
            f"<= {MEMORY_GOAL:g}x",
            ratio <= MEMORY_GOAL,
            "MB",
        ),
        ratio_row(
            f"{label}: one shuffled pass of batch-128 gathers, memory-mapped / in memory",
            *mapped["passes"],
            SPEED_GOAL,
        ),
        ratio_row(
            f"{label}: loading memory-mapped, the first time (making the .npy files) / later",
            [made["load_s"]],
            [mapped["load_s"]],
            None,
        ),
        result(
            f"{label}: validate, raw table memory-mapped from disk / in memory: anonymous "
            "memory at the peak",
            round(checked["disk"]["peak_mb"]),
            round(checked["memory"]["peak_mb"]),
            round(peak, 2),
            "—",
            True,
            "MB",
            informational=True,
        ),
        ratio_row(
            f"{label}: validate, raw table memory-mapped from disk / in memory: wall time",
            [checked["disk"]["wall_s"]],
            [checked["memory"]["wall_s"]],
            None,
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1] == "validate":
        print(json.dumps(validate_raw(sys.argv[2])))
    else:
        print(json.dumps(measure(sys.argv[1], compare="compare" in sys.argv[2:])))
