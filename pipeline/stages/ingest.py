"""Ingest: read the configured source into the canonical table under data/raw/.

Sources: ``digits`` (bundled), ``mnist`` and ``fashion-mnist`` (IDX files), ``cifar10`` (the
binary archive), ``image_folder`` (one sub-folder per class) and ``csv`` (tabular); see
:mod:`pipeline.data.sources`. Writes ``data/raw/samples.parquet`` (sample_id, label, px_*) and
``data/raw/manifest.json`` (source, row count, checksum, classes and names, sample shape, value
range, dtype, source files with their checksums). Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.config import DataParams, load_params
from pipeline.data.sources import SOURCES
from pipeline.data.table import RAW_DIR, Manifest, file_sha256
from pipeline.io import StageError, atomic_dir, run_stage, write_json


def ingest(params: DataParams) -> tuple[pd.DataFrame, dict]:
    """Load the source; return the table and the manifest fields it implies."""
    loaded = SOURCES[params.source](params)
    table = loaded.pop("table")
    if table.empty:
        raise StageError(f"data source {params.source!r} returned no rows")
    dtypes = {str(t) for t in table.dtypes.iloc[2:]}
    info = {
        "source": params.source,
        "rows": len(table),
        "dtype": dtypes.pop() if len(dtypes) == 1 else "float32",
        **loaded,
    }
    return table, info


def write_raw(table: pd.DataFrame, info: dict, out_dir: Path = RAW_DIR) -> Manifest:
    """Table and manifest appear together or not at all."""
    with atomic_dir(out_dir) as tmp:
        samples = tmp / "samples.parquet"
        table.to_parquet(samples, index=False)
        manifest = Manifest(checksum=f"sha256:{file_sha256(samples)}", **info)
        write_json(tmp / "manifest.json", manifest.to_dict())
    return manifest


def sample_kind(manifest: Manifest) -> str:
    """What one sample is: ``images 3×32×32 uint8`` or ``4 features``."""
    shape = manifest.image_shape
    if len(shape) == 1:
        return f"{shape[0]} feature{'s' if shape[0] != 1 else ''}"
    return f"images {'×'.join(map(str, shape))} {manifest.dtype}"


def main() -> None:
    params = load_params("data")
    where = "" if params.source == "digits" else f" from {params.location()}"
    print(f"[ingest] reading source {params.source!r}{where}")
    table, info = ingest(params)
    manifest = write_raw(table, info)
    print(
        f"[ingest] wrote {RAW_DIR}/samples.parquet: {manifest.rows} samples, "
        f"{len(manifest.classes)} classes, {sample_kind(manifest)}"
    )


if __name__ == "__main__":
    run_stage("ingest", main)
