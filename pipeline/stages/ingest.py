"""Ingest: read the configured source into the canonical table under data/raw/.

Sources: ``digits`` (bundled), ``mnist`` and ``fashion-mnist`` (IDX files), ``cifar10`` (the
binary archive), ``image_folder`` (one sub-folder per class) and ``csv`` (tabular); see
:mod:`pipeline.data.sources`. Writes ``data/raw/samples.parquet`` (sample_id, label, px_*) and
``data/raw/manifest.json`` (source, row count, checksum, classes and names, sample shape, value
range, dtype, source files with their checksums). Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.config import DataParams, load_params
from pipeline.data.sources import SOURCES
from pipeline.data.table import RAW_DIR, Manifest, feature_dtype, file_sha256, write_parquet
from pipeline.io import StageError, atomic_dir, run_stage, write_json


def ingest(params: DataParams) -> tuple[Iterable, dict]:
    """Load the source; return its table as Arrow tables of rows (one, or a chunk at a time
    for an image folder, which is decoded as it is written) and the manifest fields the
    source gives."""
    import pyarrow as pa

    loaded = SOURCES[params.source](params)
    if "tables" in loaded:
        tables = loaded.pop("tables")
    else:
        tables = [pa.Table.from_pandas(loaded.pop("table"), preserve_index=False)]
    return tables, {"source": params.source, **loaded}


def write_raw(tables: Iterable, info: dict, out_dir: Path = RAW_DIR) -> Manifest:
    """Write the Arrow tables as they come, then the manifest (rows, feature dtype and
    checksum from what was written). Table and manifest appear together or not at all."""
    with atomic_dir(out_dir) as tmp:
        samples = tmp / "samples.parquet"
        rows, schema = write_parquet(samples, tables)
        if not rows:
            raise StageError(f"data source {info['source']!r} returned no rows")
        manifest = Manifest(
            rows=rows,
            dtype=feature_dtype(schema),
            checksum=f"sha256:{file_sha256(samples)}",
            **info,
        )
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
    tables, info = ingest(params)
    manifest = write_raw(tables, info)
    print(
        f"[ingest] wrote {RAW_DIR}/samples.parquet: {manifest.rows} samples, "
        f"{len(manifest.classes)} classes, {sample_kind(manifest)}"
    )


if __name__ == "__main__":
    run_stage("ingest", main)
