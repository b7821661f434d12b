"""Ingest: read the configured source into the canonical table under data/raw/.

Writes ``data/raw/samples.parquet`` (sample_id, label, px_*) and ``data/raw/manifest.json``
(source, row count, checksum, classes, image shape, pixel range). Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.config import DataParams, load_params
from pipeline.data.sources import SOURCES
from pipeline.data.table import RAW_DIR, Manifest, file_sha256
from pipeline.io import StageError, atomic_path, run_stage, write_json


def ingest(params: DataParams) -> tuple[pd.DataFrame, dict]:
    """Load the source; return the table and the manifest fields it implies."""
    source = SOURCES[params.source]
    table = source.load()
    if table.empty:
        raise StageError(f"data source {params.source!r} returned no rows")
    info = {
        "source": params.source,
        "rows": len(table),
        "classes": source.classes,
        "class_names": source.class_names,
        "image_shape": source.image_shape,
        "pixel_range": source.pixel_range,
    }
    return table, info


def write_raw(table: pd.DataFrame, info: dict, out_dir: Path = RAW_DIR) -> Manifest:
    samples = out_dir / "samples.parquet"
    with atomic_path(samples) as tmp:
        table.to_parquet(tmp, index=False)
    manifest = Manifest(checksum=f"sha256:{file_sha256(samples)}", **info)
    write_json(out_dir / "manifest.json", manifest.to_dict())
    return manifest


def main() -> None:
    params = load_params("data")
    print(f"[ingest] reading source {params.source!r}")
    table, info = ingest(params)
    manifest = write_raw(table, info)
    shape = "×".join(map(str, manifest.image_shape))
    print(
        f"[ingest] wrote {RAW_DIR}/samples.parquet: {manifest.rows} samples, "
        f"{len(manifest.classes)} classes, images {shape}"
    )


if __name__ == "__main__":
    run_stage("ingest", main)
