"""A folder of images, one sub-folder per class (torchvision's ``ImageFolder`` layout).

``data.path/<class name>/**/*.png|jpg|jpeg``. Classes are the sub-folder names in sorted order.
Every image is decoded with Pillow, converted to grey (``data.color: grey``) or RGB, and resized
to ``data.image_size`` × ``data.image_size``. A file that cannot be decoded (truncated,
corrupt, not an image, or over Pillow's decompression-bomb limit, twice
``PIL.Image.MAX_IMAGE_PIXELS``) is never read as black pixels: ingest stops and names every
such file. An image between once and twice that many pixels is decoded, as Pillow allows, and
named in one line instead of Pillow's unnamed warning.
Other files (README, .DS_Store) are skipped, as ImageFolder does. Images are decoded in
threads and handed to ingest a chunk at a time, which it writes before the next is taken: a
folder never needs memory for all its decoded pixels.

A symbolic link under ``data.path`` (to a file or a folder, at any depth) that leads outside
``data.path`` stops ingest, naming the link and its target: the data set is what the folder
holds. A link that stays inside the folder is read as what it points to (a class folder that is
a link is listed like any other; links to folders below a class folder are not descended into).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.config import DataParams
from pipeline.data.table import arrow_table
from pipeline.io import StageError

EXTENSIONS = (".png", ".jpg", ".jpeg")
SHOW_FILES = 10


def _listing(files: list[str]) -> str:
    more = f"; and {len(files) - SHOW_FILES} more" if len(files) > SHOW_FILES else ""
    return "; ".join(files[:SHOW_FILES]) + more


def links_outside(root: Path) -> list[str]:
    """``link -> target`` for every symbolic link under ``root`` that leads outside it.

    The walk follows no link, so a link to a folder is reported, not entered."""
    inside = Path(os.path.realpath(root))
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(folder, name)
            if path.is_symlink():
                target = Path(os.path.realpath(path))  # a link loop stays where it is
                if not target.is_relative_to(inside):
                    found.append(f"{path} -> {target}")
    return found


def list_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) pairs, in a stable sorted order."""
    if not root.is_dir():
        raise StageError(f"{root}: image folder not found (data.path)")
    outside = links_outside(root)
    if outside:
        raise StageError(
            f"{len(outside)} symbolic link(s) under {root} lead outside it: {_listing(outside)}. "
            "Copy the files into the folder or remove the links."
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise StageError(
            f"{root}: found {len(classes)} class folder(s); expected one sub-folder per class "
            "(at least two), each holding PNG or JPEG files"
        )
    files = []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
        )
        if not found:
            raise StageError(f"{root / name}: class folder has no PNG or JPEG files")
        files += [(p, index) for p in found]
    return classes, files


def decode(path: Path, size: int, mode: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """One image as uint8 size×size×channels, or None and why it cannot be decoded; and its
    size (``W×H``) when it is over Pillow's decompression-bomb warning size (decoded all the
    same)."""
    from PIL import Image, UnidentifiedImageError

    channels = 1 if mode == "L" else 3
    large = None
    try:
        with Image.open(path) as image:
            width, height = image.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                large = f"{width}×{height}"
            image = image.convert(mode)  # forces a full decode: truncation raises here
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(size, size, channels), None, large
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as exc:
        return None, f"{type(exc).__name__}: {exc}", large


def decoders() -> int:
    """Threads that decode images: Pillow releases the GIL while it decodes and resizes."""
    return min(16, len(os.sched_getaffinity(0)))  # the cores this process may run on


# Decoded pixels held per chunk: ingest writes each chunk to the raw table as it is decoded,
# so that the pixels in memory are a few chunks (one being decoded, one being written), not
# the whole folder's.
CHUNK_BYTES = 16 << 20
# ... and at least this many images a chunk. Each chunk is a Parquet row group, and the
# writer keeps about 0.8 kB per column per row group until the file is closed: with one
# column per pixel value, 10 MB per chunk of 64×64 RGB images (12,288 columns), which grows
# with the folder: at 2,048 images a chunk, about 40 % of their uint8 pixels. For large
# images a chunk is well over CHUNK_BYTES (224×224 RGB: 308 MB).
CHUNK_ROWS = 2048


def load(params: DataParams) -> dict:
    root = params.location()
    classes, files = list_images(root)
    size, channels = params.image_size, (1 if params.color == "grey" else 3)
    rows = max(CHUNK_ROWS, CHUNK_BYTES // (size * size * channels))
    return {
        "tables": decoded_tables(root, files, size, channels, rows, len(classes)),
        "classes": list(range(len(classes))),
        "class_names": classes,
        "image_shape": [channels, size, size],
        "pixel_range": [0.0, 255.0],
        "files": {str(root): f"{len(files)} image files"},
    }


def decoded_tables(
    root: Path, files: list[tuple[Path, int]], size: int, channels: int, rows: int, n_classes: int
):
    """The canonical table of ``files`` as Arrow tables of ``rows`` images, in file order.

    Threads decode the next chunk while the caller writes the last one. A file that cannot be
    decoded stops the tables (none is yielded after it), but decoding goes on to name every
    such file in the one error raised at the end."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm import tqdm

    mode = "L" if channels == 1 else "RGB"
    bad: list[str] = []
    large: list[str] = []
    start = time.monotonic()
    threads = decoders()

    def finish(first: int, futures: list):
        # Each image goes straight into its column of the chunk (C×H×W values down, images
        # across): the Arrow columns are rows of this array, so it is the chunk's only copy.
        columns = np.empty((channels, size, size, len(futures)), dtype=np.uint8)
        for i, future in enumerate(futures):
            array, error, over = future.result()
            futures[i] = None  # its image is copied, or named below
            path = files[first + i][0]
            if over:
                large.append(f"{path} ({over})")
            if error is None:
                columns[..., i] = array.transpose(2, 0, 1)
            else:
                bad.append(f"{path} ({error})")
            progress.update()
        if bad:
            return None
        labels = np.fromiter(
            (label for _, label in files[first : first + len(futures)]), np.int64, len(futures)
        )
        return arrow_table(columns.reshape(-1, len(futures)).T, labels)

    with (
        warnings.catch_warnings(),
        ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool,
        tqdm(
            total=len(files),
            desc="[ingest] decoding",
            unit=" images",
            mininterval=1 if sys.stderr.isatty() else 5,  # a log gets a line every 5 s
            disable=len(files) < 1000,
        ) as progress,
    ):
        # Pillow warns, without naming the file, for images between 1x and 2x its limit;
        # they are named below in one line instead. Over 2x, Image.open raises.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pending = None  # (first row, futures) of the chunk to finish next
        try:
            for first in [*range(0, len(files), rows), None]:
                ahead = None  # the chunk after it, decoded while it is finished and written
                if first is not None:
                    chunk = files[first : first + rows]
                    ahead = (first, [pool.submit(decode, p, size, mode) for p, _ in chunk])
                if pending is not None:
                    table = finish(*pending)
                    if table is not None:
                        yield table
                    table = None  # not held while the next chunk is assembled
                pending = ahead
        except BaseException:
            # ^C, SIGTERM, or the caller stopped (its writer failed): the images not yet
            # started are not decoded; the pool waits only for those being decoded.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if bad:
        raise StageError(
            f"{len(bad)} of {len(files)} image file(s) under {root} cannot be decoded: "
            f"{_listing(bad)}. Fix or remove them."
        )
    if large:
        print(
            f"[ingest] {len(large)} image(s) over Pillow's decompression-bomb warning size "
            f"({Image.MAX_IMAGE_PIXELS} pixels) decoded: {_listing(large)}"
        )
    print(
        f"[ingest] decoded {len(files)} images in {n_classes} classes "
        f"({time.monotonic() - start:.1f}s, {threads} threads)"
    )
