"""MNIST- and CIFAR-scale data through the gate: ``ingest`` then ``validate`` on generated
sets in the sources' own formats, each stage run as ``python -m pipeline.stages.<stage>``
in a scratch copy of the project (see stages).

- MNIST-scale: 70,000 grey 28×28 images as the four IDX files (gzipped, as published),
  ``data.source: mnist``.
- CIFAR-scale: 60,000 RGB 32×32 images as ``cifar-10-binary.tar.gz`` (five data batches and
  a test batch of 10,000), ``data.source: cifar10``.
- An image folder: 20,000 RGB 64×64 PNG files, one sub-folder per class,
  ``data.source: image_folder`` at ``image_size: 64``: ingest decodes and writes it a chunk
  at a time. Its wall time is for information, its memory has the others' goal. Its
  prepared splits are then loaded for training memory-mapped from disk and in memory
  (see mapped).

The images are scikit-learn's digits, each at a random size, place, brightness and colour
with noise (:func:`synthetic_digits`): learnable, never two alike, no download.

Goals: ingest + validate within ``WALL_GOAL`` seconds on 2 cores, and the memory that grows
with the data within ``MEMORY_GOAL`` × the uint8 pixel data. That memory is each stage's
peak resident memory on the large set less its peak on the digits (1,797 images of 8×8):
what the interpreter and its libraries take (torch, pandas, Great Expectations: some
250 MB whatever the data) is no part of the data's cost.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np

from benchmarks import mapped
from benchmarks.common import Context, project_copy, result
from benchmarks.stages import run_stage

WALL_GOAL = {"mnist": 30.0, "cifar10": 60.0}
MEMORY_GOAL = 3.0
GATE = ("ingest", "validate")


def synthetic_digits(
    n: int, size: int, channels: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images N×C×size×size and int64 labels: a scikit-learn digit (8×8) resized
    to a random 16–22 pixels, put at a random place, at a random brightness (and, in colour,
    tint, on a random background), plus noise. Same arguments, same images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    scales = (16, 18, 20, 22)
    templates = {
        s: np.stack(
            [
                np.asarray(
                    Image.fromarray((d * (255 / 16)).astype(np.uint8)).resize(
                        (s, s), Image.Resampling.BILINEAR
                    )
                )
                for d in digits.images
            ]
        ).astype(np.float32)
        / 255
        for s in scales
    }
    pick = rng.integers(0, len(digits.images), n)
    scale = rng.integers(0, len(scales), n)
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    chunk = 5_000
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        canvas = np.zeros((m, size, size), dtype=np.float32)
        for i in range(m):
            s = scales[scale[start + i]]
            dy, dx = rng.integers(0, size - s + 1, 2)
            canvas[i, dy : dy + s, dx : dx + s] = templates[s][pick[start + i]]
        level = rng.uniform(0.5, 1.0, (m, 1, 1, 1)).astype(np.float32)
        if channels == 1:
            tint = np.ones((m, 1, 1, 1), dtype=np.float32)
            background = np.zeros((m, 1, 1, 1), dtype=np.float32)
        else:
            tint = rng.uniform(0.3, 1.0, (m, channels, 1, 1)).astype(np.float32)
            background = rng.uniform(0.0, 0.4, (m, channels, 1, 1)).astype(np.float32)
        noise = rng.normal(0, 0.08, (m, channels, size, size)).astype(np.float32)
        image = background + canvas[:, None] * level * tint + noise
        images[start:stop] = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return images, digits.target[pick].astype(np.int64)


def idx_file(path: Path, array: np.ndarray) -> None:
    """An IDX file (big-endian header and values), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path.with_name(path.name + ".gz"), "wb", compresslevel=6) as out:
        out.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist_scale(folder: Path, train: int = 60_000, test: int = 10_000) -> int:
    """The four MNIST files; returns the pixel bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_digits(train + test, 28)
    for name, part in (("train", slice(0, train)), ("t10k", slice(train, None))):
        idx_file(folder / f"{name}-images-idx3-ubyte", x[part, 0])
        idx_file(folder / f"{name}-labels-idx1-ubyte", y[part].astype(np.uint8))
    return x.nbytes


def write_cifar_scale(path: Path, per_batch: int = 10_000) -> int:
    """``cifar-10-binary.tar.gz`` with the published member layout; returns the pixel bytes."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    x, y = synthetic_digits(per_batch * len(batches), 32, channels=3, seed=1)
    with tarfile.open(path, "w:gz", compresslevel=6) as archive:
        for i, name in enumerate(batches):
            part = slice(i * per_batch, (i + 1) * per_batch)
            records = np.concatenate(
                [y[part].astype(np.uint8)[:, None], x[part].reshape(per_batch, -1)], axis=1
            ).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(records)
            archive.addfile(info, io.BytesIO(records))
    return x.nbytes


def write_image_folder_scale(folder: Path, n: int = 20_000, size: int = 64) -> int:
    """``folder/<digit>/<i>.png``: ``n`` RGB images of ``size`` pixels, one sub-folder per
    class (torchvision's ImageFolder layout); returns the pixel bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    x, y = synthetic_digits(n, size, channels=3, seed=2)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / str(y[i]) / f"{i:06d}.png")

    with ThreadPoolExecutor(4) as pool:  # Pillow encodes without holding Python's lock
        list(pool.map(save, range(n)))
    return x.nbytes


def set_source(project: Path, source: str, **data) -> None:
    import yaml

    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["data"].update(source=source, **data)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def gate(project: Path) -> dict[str, tuple[float, int]]:
    """Wall seconds and peak kB of each gate stage."""
    return {stage: run_stage(stage, project) for stage in GATE}


def scale_project(ctx: Context) -> Path:
    """A scratch copy of the project, with the gate's cost on the digits recorded."""

    def build() -> Path:
        project = project_copy(ctx.scratch / "scale")
        ctx.report.setdefault("scale", {})["digits"] = {
            s: {"wall_s": round(w, 1), "peak_rss_mb": round(kb / 1024)}
            for s, (w, kb) in gate(project).items()
        }
        return project

    return ctx.once("scale_project", build)


IMAGE_FOLDER = "data/external/image_folder"

# (source, row label, writer of the set's files given their path, data section keys)
SETS = (
    ("mnist", "MNIST-scale (70,000 × 1×28×28)", write_mnist_scale, {}),
    ("cifar10", "CIFAR-scale (60,000 × 3×32×32)", write_cifar_scale, {}),
    (
        "image_folder",
        "Image folder (20,000 PNG files, 3×64×64)",
        write_image_folder_scale,
        {"path": IMAGE_FOLDER, "image_size": 64, "color": "rgb"},
    ),
)


def run(ctx: Context, sets=SETS) -> list[dict]:
    import yaml

    project = scale_project(ctx)
    original = yaml.safe_load((project / "params.yaml").read_text())["data"]
    base = ctx.report["scale"]["digits"]
    rows = []
    for source, label, write, data in sets:
        target = project / "data/external" / source
        pixels = write(target if source != "cifar10" else target / "cifar-10-binary.tar.gz")
        set_source(project, source, **data)
        costs = gate(project)
        wall = sum(w for w, _ in costs.values())
        grown = max(kb / 1024 - base[s]["peak_rss_mb"] for s, (_, kb) in costs.items())
        ctx.report["scale"][source] = {
            s: {"wall_s": round(w, 1), "peak_rss_mb": round(kb / 1024)}
            for s, (w, kb) in costs.items()
        }
        print(
            "  " + ", ".join(f"{s} {w:.1f} s {kb / 1024:.0f} MB" for s, (w, kb) in costs.items()),
            flush=True,
        )
        goal = WALL_GOAL.get(source)  # none for the image folder: for information
        rows.append(
            result(
                f"{label}: ingest + validate wall time",
                round(wall, 1),
                None,
                None,
                f"<= {goal:.0f} s" if goal else "—",
                wall <= goal if goal else True,
                "s",
                informational=goal is None,
            )
        )
        data_mb = pixels / 2**20
        rows.append(
            result(
                f"{label}: memory grown with the data / uint8 pixels ({data_mb:.0f} MB)",
                round(grown),
                round(data_mb),
                round(grown / data_mb, 2),
                f"<= {MEMORY_GOAL:g}x",
                grown <= MEMORY_GOAL * data_mb,
                "MB",
            )
        )
        if source == "image_folder":  # the set an image folder too large for memory would be
            rows.extend(mapped.rows(project, label))
    set_source(project, **original)  # the project's own data section again
    return rows
