"""The canonical table and the in-memory batch loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.loader import TensorBatches, to_tensors
from pipeline.data.table import arrow_table, content_ids, make_table


def test_digits_table_is_canonical(digits_table):
    assert list(digits_table.columns[:2]) == ["sample_id", "label"]
    assert len(digits_table.columns) == 2 + 64
    assert len(digits_table) == 1797
    assert digits_table["label"].dtype == np.int64
    assert digits_table["px_0"].dtype == np.float32
    assert digits_table["sample_id"].str.fullmatch(r"[0-9a-f]{16}").all()


def test_sample_id_is_a_content_hash():
    a = np.arange(64, dtype=np.float32).reshape(1, 64)
    b = a.copy()
    b[0, 5] += 1
    assert content_ids(a) == content_ids(a.astype(np.float64))  # same content, same id
    assert content_ids(a) != content_ids(b)
    table = make_table(np.vstack([a, a]), [3, 7])
    assert table["sample_id"].nunique() == 1  # labels are not part of the id


def test_make_table_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 feature rows but 1 labels"):
        make_table(np.zeros((2, 4)), [1])
    with pytest.raises(ValueError, match="2 feature rows but 1 labels"):
        arrow_table(np.zeros((2, 4)), [1])
    with pytest.raises(ValueError, match=r"must be 2-D \(samples × features\), got shape \(2,\)"):
        arrow_table(np.zeros(2), [1, 2])


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_arrow_table_is_what_pandas_makes_of_make_table(dtype):
    """The same columns, types and values (NaN as null) as pandas' conversion of the frame,
    without its metadata; float64 is stored as float32, as make_table stores it."""
    import pyarrow as pa

    features = np.arange(24, dtype=dtype).reshape(4, 6)
    if dtype == np.float64:
        features[1, 2] = np.nan
    labels = np.array([3, 1, 4, 1])
    ours = arrow_table(features, labels)
    pandas = pa.Table.from_pandas(make_table(features, labels), preserve_index=False)
    # pandas' str column is Arrow's large_string; Parquet stores both as the same strings
    assert ours.equals(pandas.replace_schema_metadata(None).cast(ours.schema))
    assert ours.column("px_2").null_count == (dtype == np.float64)
    assert ours.schema.field("px_0").type == (pa.uint8() if dtype == np.uint8 else pa.float32())


def test_batches_cover_every_sample_once_per_epoch():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    batches = TensorBatches(x, y, batch_size=4, shuffle=True, seed=1)
    assert len(batches) == 3
    epoch1 = torch.cat([yb for _, yb in batches])
    epoch2 = torch.cat([yb for _, yb in batches])
    assert sorted(epoch1.tolist()) == list(range(10))
    assert sorted(epoch2.tolist()) == list(range(10))
    assert epoch1.tolist() != epoch2.tolist()  # a new order every epoch
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)  # inputs stay paired with labels
    again = TensorBatches(x, y, batch_size=4, shuffle=True, seed=1)
    assert torch.cat([yb for _, yb in again]).tolist() == epoch1.tolist()  # reproducible


def test_unshuffled_and_drop_last():
    x, y = torch.zeros(10, 2), torch.arange(10)
    assert [len(b[1]) for b in TensorBatches(x, y, 4)] == [4, 4, 2]
    assert [len(b[1]) for b in TensorBatches(x, y, 4, drop_last=True)] == [4, 4]
    assert torch.cat([b[1] for b in TensorBatches(x, y, 3)]).tolist() == list(range(10))


def test_to_tensors_shapes(digits_table):
    x, y = to_tensors(digits_table.head(5), [1, 8, 8])
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == digits_table["label"].head(5).tolist()
    pixels = digits_table.filter(like="px_").head(5).to_numpy(np.float32)
    assert torch.equal(x.reshape(5, -1), torch.tensor(pixels))


def test_data_parallel_ranks_split_each_pass_evenly():
    """Two ranks: the same permutation cut in two interleaved halves, the shorter padded with
    the pass's first samples (as torch's DistributedSampler), so both run as many steps."""
    x = torch.arange(11).float().unsqueeze(1)
    y = torch.arange(11)
    ranks = [TensorBatches(x, y, 4, shuffle=True, seed=3, rank=r, world=2) for r in (0, 1)]
    alone = TensorBatches(x, y, 4, shuffle=True, seed=3)
    for _ in range(2):  # two passes, two permutations
        order = torch.cat([b for _, b in alone])
        seen = [torch.cat([b for _, b in batches]) for batches in ranks]
        assert [len(batches) for batches in ranks] == [2, 2]
        assert len(seen[0]) == len(seen[1]) == 6
        assert seen[0].tolist() == order[0::2].tolist()
        assert seen[1].tolist() == order[1::2].tolist() + [order[0].item()]


@pytest.mark.parametrize(("shuffle", "world"), [(True, 1), (False, 1), (True, 2)])
def test_a_resumed_pass_serves_the_batches_that_were_left(shuffle, world):
    x = torch.arange(103 * 4).reshape(103, 4)
    y = torch.arange(103)
    for rank in range(world):
        options = {"shuffle": shuffle, "seed": 3, "rank": rank, "world": world}
        batches = TensorBatches(x, y, 10, **options)
        for _ in range(2):  # two whole passes: the generator moves on
            list(batches)
        state = None
        for i, _ in enumerate(batches):  # 3 batches of the third pass
            if i == 2:
                state = batches.state_dict()
                break
        resumed = TensorBatches(x, y, 10, **options)
        resumed.load_state_dict(state)
        rest = list(resumed)
        uninterrupted = TensorBatches(x, y, 10, **options)
        for _ in range(2):
            list(uninterrupted)
        expected = list(uninterrupted)[3:]  # its third pass from the 4th batch
        assert len(rest) == len(expected) == len(batches) - 3
        for (xa, ya), (xb, yb) in zip(rest, expected, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shuffled_batches_are_gathered_one_at_a_time_and_in_order_ones_are_views():
    """No copy of a whole pass: a shuffled batch is a tensor of its own samples only, an
    unshuffled one a view of the data."""
    x, y = torch.randn(1000, 3), torch.arange(1000)
    first_x, first_y = next(iter(TensorBatches(x, y, 64, shuffle=True)))
    assert first_x.untyped_storage().nbytes() == 64 * 3 * 4
    assert first_y.untyped_storage().nbytes() == 64 * 8
    in_order_x, _ = next(iter(TensorBatches(x, y, 64)))
    assert in_order_x.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert torch.equal(in_order_x, x[:64])


@pytest.mark.parametrize("kind", ["uint8", "float32", "nulls", "mixed", "no_features"])
def test_read_table_reads_what_pandas_reads(tmp_path, kind, monkeypatch):
    """The column-group reader gives exactly pd.read_parquet's frame, and falls back to it for
    tables it does not handle (nulls, mixed feature types, no features)."""
    import pandas as pd

    from pipeline.data import table as table_module
    from pipeline.data.table import read_table

    rng = np.random.default_rng(0)
    features = rng.integers(0, 256, (300, 150)).astype(np.uint8)
    frame = make_table(features if kind != "float32" else features / 7, np.arange(300) % 3)
    if kind == "nulls":
        frame["px_3"] = frame["px_3"].astype("float32")
        frame = frame.astype({c: "float32" for c in frame.columns if c.startswith("px_")})
        frame.loc[5, "px_9"] = np.nan
    if kind == "mixed":
        frame["px_3"] = frame["px_3"].astype("float32")
    if kind == "no_features":
        frame = frame[["sample_id", "label"]]
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False, row_group_size=128)  # several row groups
    monkeypatch.setattr(table_module, "READ_COLUMNS", 16)  # several column groups
    pd.testing.assert_frame_equal(read_table(path), pd.read_parquet(path))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_prepared_splits_are_written_a_row_group_at_a_time(tmp_path, monkeypatch, manifest, dtype):
    """Row groups of 100 rows, built a column at a time from tiles of 10 columns (the last
    one of 4): each split's rows as pandas reads them, with the types and pandas metadata
    that ``to_parquet`` writes."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.table import read_table
    from pipeline.stages import validate

    rng = np.random.default_rng(1)
    features = rng.integers(0, 17, (500, 64)).astype(np.uint8)
    kept = make_table(features if dtype == "uint8" else features / 3, np.arange(500) % 10)
    if dtype == "float32":
        kept.loc[7, "px_5"] = np.nan  # written as a null, as pandas' conversion does
    kept.insert(2, "split", np.array(["train", "val", "test", "train"])[np.arange(500) % 4])
    monkeypatch.setattr(validate, "WRITE_ROWS", 100)
    monkeypatch.setattr(validate, "TILE_COLUMNS", 10)
    validate.write_prepared(kept, manifest, tmp_path / "prepared")
    for split in ("train", "val", "test"):
        path = tmp_path / "prepared" / f"{split}.parquet"
        expected = kept[kept["split"] == split].drop(columns="split").reset_index(drop=True)
        pd.testing.assert_frame_equal(read_table(path), expected)
        rows = len(expected)
        assert pq.ParquetFile(path).num_row_groups == -(-rows // 100)
        written = pa.Schema.from_pandas(expected, preserve_index=False)
        assert pq.read_schema(path).equals(written, check_metadata=True)
        assert pq.read_schema(path).field("px_0").type == pa.from_numpy_dtype(np.dtype(dtype))
        nulls = pq.read_table(path, columns=["px_5"]).column("px_5").null_count
        assert nulls == pa.Table.from_pandas(expected).column("px_5").null_count


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_a_prepared_splits_table_and_inputs_share_one_copy_of_its_features(
    tmp_path, manifest, dtype
):
    """The table is what pandas reads and the inputs what to_tensors makes of it; for uint8
    and float32 features they are one array, for float64 the inputs are a float32 copy."""
    import pandas as pd

    from pipeline.data.loader import load_prepared
    from pipeline.data.table import features_of
    from pipeline.io import write_json

    rng = np.random.default_rng(2)
    table = make_table(rng.integers(0, 17, (50, 64)).astype(np.uint8), np.arange(50) % 10)
    table = table.astype({c: dtype for c in features_of(table)})
    table.to_parquet(tmp_path / "train.parquet", index=False)
    write_json(tmp_path / "manifest.json", manifest.to_dict())
    data = load_prepared(tmp_path, splits=("train",))
    x, y = data.tensors["train"]
    read = pd.read_parquet(tmp_path / "train.parquet")
    pd.testing.assert_frame_equal(data.tables["train"], read)
    expected_x, expected_y = to_tensors(read, [1, 8, 8])
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    assert x.dtype == (torch.uint8 if dtype == "uint8" else torch.float32)
    shared = np.shares_memory(x.numpy(), data.tables["train"]["px_3"].to_numpy())
    assert shared == (dtype != "float64")


def test_a_table_with_nullable_or_null_floats_is_read_as_pandas_reads_it(tmp_path):
    """read_table reads what pd.read_parquet reads: pandas' own Float32 with NA stays Float32,
    a null in a float32 column is NaN."""
    import pandas as pd

    from pipeline.data.table import read_table

    table = make_table(np.arange(4 * 64, dtype=np.float32).reshape(4, 64), np.arange(4))
    table.loc[1, "px_2"] = np.nan
    table.to_parquet(tmp_path / "numpy.parquet", index=False)
    table["px_5"] = pd.array([1.0, None, 2.0, 3.0], dtype="Float32")
    table.to_parquet(tmp_path / "pandas.parquet", index=False)
    for name in ("numpy", "pandas"):
        path = tmp_path / f"{name}.parquet"
        pd.testing.assert_frame_equal(read_table(path), pd.read_parquet(path))
    assert read_table(tmp_path / "pandas.parquet")["px_5"].dtype == "Float32"


def write_splits(folder, manifest, seed: int, dtype: str = "uint8", rows=(90, 30)) -> None:
    """Train and val splits as validate writes them, in row groups of 16 rows."""
    from pipeline.data.table import features_of
    from pipeline.io import write_json

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), rows, strict=True):
        table = make_table(rng.integers(0, 17, (n, 64)).astype(np.uint8), np.arange(n) % 10)
        table = table.astype({c: dtype for c in features_of(table)})
        table.to_parquet(folder / f"{split}.parquet", index=False, row_group_size=16)
    write_json(folder / "manifest.json", manifest.to_dict())


@pytest.mark.parametrize("dtype", ["uint8", "float64"])
def test_splits_memory_mapped_from_disk_are_the_splits_read_into_memory(tmp_path, manifest, dtype):
    """train.data_placement: disk gives the tensors (and ids and labels) that memory gives,
    from a .npy file per split named by its Parquet file's identity, made once, made again
    when it is not the split's array, and replaced when the split changes."""
    import pandas as pd

    from pipeline.data.loader import load_prepared
    from pipeline.data.mapped import file_identity, shared_take
    from pipeline.data.table import features_of

    prepared, mapped = tmp_path / "prepared", tmp_path / "mapped"
    prepared.mkdir()
    write_splits(prepared, manifest, seed=3, dtype=dtype)

    def files():
        return sorted(p.name for p in mapped.glob("*.npy"))

    def named(split):
        return f"{split}-{file_identity(prepared / f'{split}.parquet')}.npy"

    in_memory = load_prepared(prepared, ("train", "val"))
    on_disk = load_prepared(prepared, ("train", "val"), placement="disk", mapped_dir=mapped)
    assert (in_memory.storage, on_disk.storage) == ("memory", "disk")
    assert on_disk.storage_reason == "0.0 MB, train.data_placement: disk"  # 120 × 64 × 1 or 4 B
    assert files() == [named("train"), named("val")]
    for split in ("train", "val"):
        x, y = on_disk.tensors[split]
        assert torch.equal(x, in_memory.tensors[split][0])
        assert torch.equal(y, in_memory.tensors[split][1])
        assert x.dtype == (torch.uint8 if dtype == "uint8" else torch.float32)
        file = np.load(mapped / named(split))
        assert np.array_equal(file, x.reshape(len(x), -1).numpy())
        front = on_disk.tables[split].drop(columns=features_of(on_disk.tables[split]))
        expected = in_memory.tables[split][["sample_id", "label"]]
        pd.testing.assert_frame_equal(front, expected)
        # The table's features are the mapped inputs.
        assert np.shares_memory(x.numpy(), on_disk.tables[split]["px_3"].to_numpy())

    made = (mapped / named("train")).stat().st_mtime_ns
    again = load_prepared(prepared, ("train",), placement="disk", mapped_dir=mapped)
    assert (mapped / named("train")).stat().st_mtime_ns == made  # read, not made again
    assert torch.equal(again.tensors["train"][0], in_memory.tensors["train"][0])
    other = np.float32 if dtype == "uint8" else np.uint8
    for broken in (b"not an array", None):  # cut short; the right shape, another dtype
        if broken is None:
            np.save(mapped / named("train"), np.zeros((90, 64), dtype=other))
        else:
            (mapped / named("train")).write_bytes(broken)
        remade = load_prepared(prepared, ("train",), placement="disk", mapped_dir=mapped)
        assert torch.equal(remade.tensors["train"][0], in_memory.tensors["train"][0])

    # Rows taken of the split (tune's cut), and a full-size temporary file of a writer that
    # was killed (its pid is above the system's largest).
    values = remade.tensors["train"][0].numpy().reshape(90, -1)
    taken = Path(
        shared_take(mapped / named("train"), "train", np.arange(0, 90, 2), values).filename
    )
    assert files() == sorted([named("train"), named("val"), taken.name])
    killed = mapped / f".{named('train')[:-4]}-rows-0123456789abcdef.npy.99999999.x1y2.tmp"
    killed.write_bytes(b"\0" * 4096)
    old_train, old_val = named("train"), named("val")
    write_splits(prepared, manifest, seed=4, dtype=dtype)  # new data
    changed = load_prepared(prepared, ("train",), placement="disk", mapped_dir=mapped)
    assert named("train") != old_train
    # The old train file, the rows taken of it and the killed writer's file are gone.
    assert files() == sorted([named("train"), old_val])
    assert sorted(p.name for p in mapped.iterdir()) == sorted(
        [named("train"), old_val, "train.lock", "val.lock"]
    )
    fresh = load_prepared(prepared, ("train",))
    assert torch.equal(changed.tensors["train"][0], fresh.tensors["train"][0])


def test_splits_are_memory_mapped_when_they_take_over_half_the_available_memory(tmp_path, manifest):
    from pipeline.data.mapped import input_layout, storage

    gb = 2**30
    assert storage("auto", 3 * gb, available=8 * gb) == (
        "memory",
        "3072 MB, 8.0 GB available in host memory",
    )
    assert storage("auto", 5 * gb, available=8 * gb) == (
        "disk",
        "5120 MB, 8.0 GB available in host memory: more than 50% of it",
    )
    assert storage("auto", 3 * gb, available=8 * gb, processes=2) == (  # tune workers, DDP
        "disk",
        "3072 MB × 2 processes, 8.0 GB available in host memory: more than 50% of it",
    )
    assert storage("disk", 2**20) == ("disk", "1.0 MB, train.data_placement: disk")
    assert storage("host", 2**20) == ("memory", "1.0 MB, train.data_placement: host")
    assert storage("device", 2**20) == ("memory", "1.0 MB, train.data_placement: device")
    write_splits(tmp_path, manifest, seed=5, dtype="uint8")
    assert input_layout(tmp_path / "train.parquet").nbytes == 90 * 64  # uint8 inputs
    write_splits(tmp_path, manifest, seed=5, dtype="float64")
    assert input_layout(tmp_path / "train.parquet").nbytes == 90 * 64 * 4  # float32 inputs


def test_features_that_are_not_one_block_of_numbers_stop_a_mapped_load_with_one_line(
    tmp_path, manifest
):
    from pipeline.data.loader import load_prepared
    from pipeline.io import StageError, write_json

    table = make_table(np.arange(20 * 64, dtype=np.float32).reshape(20, 64), np.arange(20) % 10)
    table["px_5"] = table["px_5"].astype(str)  # text among the numbers
    table.to_parquet(tmp_path / "train.parquet", index=False)
    write_json(tmp_path / "manifest.json", manifest.to_dict())
    with pytest.raises(StageError) as caught:
        load_prepared(tmp_path, ("train",), placement="disk", mapped_dir=tmp_path / "mapped")
    assert str(caught.value) == (
        f"{tmp_path / 'train.parquet'}: its features are not one block of numbers, so they "
        "cannot be memory-mapped; set train.data_placement: host"
    )
    assert sorted(p.name for p in (tmp_path / "mapped").iterdir()) == ["train.lock"]


FULL_DISK = """
import sys
from pathlib import Path

from pipeline.io import run_stage


def train():
    from pipeline.data.loader import load_prepared

    load_prepared(Path("prepared"), ("train",), placement="disk", mapped_dir=Path("mapped"))


def validate():
    from pipeline.stages.validate import read_raw

    read_raw(Path("raw"), "disk")


run_stage(sys.argv[1], {"train": train, "validate": validate}[sys.argv[1]])
"""


def full_disk_project(folder: Path, manifest, rows: int = 90) -> None:
    """A raw table and prepared splits in ``folder`` for :data:`FULL_DISK`: the train copy
    of features takes ``rows`` × 64 × 4 B (float32 inputs), validate's of the raw table
    twice that (float64)."""
    from pipeline.io import write_json

    (folder / "prepared").mkdir()
    write_splits(folder / "prepared", manifest, seed=6, dtype="float64", rows=(rows, 30))
    (folder / "raw").mkdir()
    (folder / "prepared/train.parquet").rename(folder / "raw/samples.parquet")
    write_json(folder / "raw/manifest.json", manifest.to_dict())
    write_splits(folder / "prepared", manifest, seed=6, dtype="float64", rows=(rows, 30))


def test_no_room_for_memory_mapped_features_stops_with_one_line(tmp_path, manifest):
    """A disk that cannot take the mapped copy of a split, or validate's scratch copy of the
    raw features, stops the stage with one line naming the folder, exit 1, and no file left
    (instead of a traceback, or SIGBUS when a page of the mapping is first written). The
    process may write files of at most 4 kB (RLIMIT_FSIZE: writes past it fail with EFBIG,
    as they fail with ENOSPC on a full disk)."""
    import resource
    import subprocess
    import sys

    from tests.conftest import project_env

    full_disk_project(tmp_path, manifest)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    lines = {}
    for stage in ("train", "validate"):
        done = subprocess.run(
            [sys.executable, "-c", FULL_DISK, stage],
            cwd=tmp_path,
            env=project_env(),
            capture_output=True,
            text=True,
            preexec_fn=small_files,
        )
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        lines[stage] = done.stderr
    assert lines == {
        "train": "[train] error: mapped: cannot make a file of 0.0 MB for memory-mapped "
        "features: File too large\n",
        "validate": "[validate] error: .runway/prepared: cannot make a file of 0.0 MB for "
        "memory-mapped features: File too large\n",
    }
    assert sorted(p.name for p in (tmp_path / "mapped").iterdir()) == ["train.lock"]
    assert list((tmp_path / ".runway/prepared").iterdir()) == []


def test_a_full_file_system_stops_the_copy_when_its_room_is_taken(tmp_path, manifest):
    """A real full file system: the folders of the copies are a tmpfs of 3 pages each, in a
    mount namespace of the stage's own (``unshare``, no root needed). A copy's .npy file is
    sparse until its room is taken, so making it fits (two pages are written), and
    ``posix_fallocate`` of its 4 pages or more then fails with ENOSPC: the stage stops
    there with one line, exit 1, and leaves nothing but the split's lock (listed from
    inside the namespace). Without the fallocate the stage dies of SIGBUS."""
    import os
    import shutil
    import subprocess
    import sys

    from pipeline.data.mapped import megabytes
    from tests.conftest import project_env

    page = os.sysconf("SC_PAGE_SIZE")
    probe = ["unshare", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "x", str(tmp_path)]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("this system lets no process mount a tmpfs in a namespace of its own")
    rows = max(90, 4 * page // (64 * 4) + 1)
    full_disk_project(tmp_path, manifest, rows)
    for folder in ("mapped", ".runway/prepared"):
        (tmp_path / folder).mkdir(parents=True)
    in_namespace = (
        f"mount -t tmpfs -o size={3 * page} tmpfs mapped && "
        f"mount -t tmpfs -o size={3 * page} tmpfs .runway/prepared && "
        '"$0" -c "$1" "$2"; code=$?; ls -A mapped; echo --; ls -A .runway/prepared; exit $code'
    )
    lines = {}
    for stage in ("train", "validate"):
        done = subprocess.run(
            ["unshare", "--map-root-user", "--mount", "sh", "-c", in_namespace]
            + [sys.executable, FULL_DISK, stage],
            cwd=tmp_path,
            env=project_env(),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1, done.stderr
        lines[stage] = (done.stderr, done.stdout)
    assert lines == {
        "train": (
            f"[train] error: mapped: cannot make a file of {megabytes(rows * 64 * 4)} for "
            "memory-mapped features: No space left on device\n",
            "train.lock\n--\n",
        ),
        "validate": (
            f"[validate] error: .runway/prepared: cannot make a file of "
            f"{megabytes(rows * 64 * 8)} for memory-mapped features: No space left on device\n",
            "--\n",
        ),
    }


def test_each_parquet_footer_is_read_once(tmp_path, manifest, monkeypatch):
    """A wide table's footer takes about 0.1 s per 10,000 columns to read (and it is read
    whole whichever columns are wanted): validate reads the raw table's once, its features
    one block of numbers or not, and a load each split's once, in memory or memory-mapped,
    the copy made or found."""
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.data.loader import load_prepared
    from pipeline.stages.validate import read_raw

    prepared, raw = tmp_path / "prepared", tmp_path / "raw"
    for folder in (prepared, raw):
        folder.mkdir()
        write_splits(folder, manifest, seed=8)
    (raw / "train.parquet").rename(raw / "samples.parquet")
    reads = []

    def read(source) -> None:
        reads.append(Path(source).name if isinstance(source, str | Path) else repr(source))

    def counted(reader):
        def reading(source, *args, **kwargs):
            read(source)
            return reader(source, *args, **kwargs)

        return reading

    opened = pq.ParquetFile.__init__

    def opening(self, source, *args, **kwargs):
        read(source)
        opened(self, source, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", opening)
    for module, name in ((pq, "read_metadata"), (pq, "read_schema"), (pq, "read_table")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    monkeypatch.setattr(pd, "read_parquet", counted(pd.read_parquet))
    for placement in ("memory", "disk"):
        reads.clear()
        table, _, _ = read_raw(raw, placement)
        assert (len(table), reads) == (90, ["samples.parquet"])
    # Features with a null are read as pandas reads them (and so is a table read in memory
    # when they cannot be memory-mapped): the footer, still once.
    with_null = pd.read_parquet(raw / "samples.parquet").astype({"px_7": "Float32"})
    with_null.loc[3, "px_7"] = None
    with_null.to_parquet(raw / "samples.parquet", index=False)
    for placement in ("memory", "disk"):
        reads.clear()
        table, _, _ = read_raw(raw, placement)
        assert (table["px_7"].dtype, reads) == ("Float32", ["samples.parquet"])
    for placement in ("memory", "disk", "disk"):  # the copies made, then found
        reads.clear()
        data = load_prepared(prepared, ("train", "val"), placement, tmp_path / "mapped")
        assert (data.storage, reads) == (placement, ["train.parquet", "val.parquet"])


def test_a_split_replaced_after_it_was_opened_is_mapped_as_it_was_opened(tmp_path, manifest):
    """A load opens every split before it copies any: one that validate replaces meanwhile
    is copied from the file it opened, under that file's name, which other late loads map
    too, and a load of the new one meanwhile keeps its copy."""
    import os

    from pipeline.data.loader import load_prepared
    from pipeline.data.mapped import file_identity, input_layout, mapped_features
    from pipeline.data.table import features_of, read_table

    prepared, newer, mapped = tmp_path / "prepared", tmp_path / "newer", tmp_path / "mapped"
    for folder, seed in ((prepared, 9), (newer, 10)):
        folder.mkdir()
        write_splits(folder, manifest, seed=seed)
    path = prepared / "train.parquet"
    opened, layout = read_table(path), input_layout(path)
    os.replace(newer / "train.parquet", path)
    current = load_prepared(prepared, ("train",), "disk", mapped).tensors["train"][0]
    _, values, features = mapped_features(path, mapped / "train", layout)
    assert np.array_equal(values, opened[features].to_numpy())
    assert Path(values.filename).name == f"train-{layout.identity}.npy"
    assert layout.identity != file_identity(path)
    # The late copy, of a split no longer there, leaves the current one; the next load of
    # the current split removes the late one (still mapped where it is used).
    late, now = f"train-{layout.identity}.npy", f"train-{file_identity(path)}.npy"
    assert sorted(p.name for p in mapped.iterdir()) == sorted([late, now, "train.lock"])
    made = os.stat(values.filename)
    assert mapped_features(path, mapped / "train", layout)[1].filename == values.filename
    found = os.stat(values.filename)  # mapped, not made again (a new file, a new inode)
    assert (found.st_ino, found.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    again = load_prepared(prepared, ("train",), "disk", mapped).tensors["train"][0]
    assert sorted(p.name for p in mapped.iterdir()) == [now, "train.lock"]
    new = read_table(path)
    for tensor in (current, again):
        assert np.array_equal(
            tensor.reshape(len(tensor), -1).numpy(), new[features_of(new)].to_numpy()
        )
    assert np.array_equal(values, opened[features].to_numpy())  # still mapped


def test_with_features_keeps_the_front_columns_types():
    import pandas as pd

    from pipeline.data.table import with_features

    front = pd.DataFrame(
        {
            "sample_id": ["a", "b"],
            "label": [1, 2],
            "kind": pd.Categorical(["x", "y"]),
            "count": pd.array([1, None], dtype="Int64"),
        }
    )
    values = np.arange(6, dtype=np.uint8).reshape(2, 3)
    table = with_features(front, values, ["px_0", "px_1", "px_2"])
    pd.testing.assert_frame_equal(table[front.columns], front)
    assert np.shares_memory(table["px_1"].to_numpy(), values)


# The rows of the train split that the processes below take (as tune's workers take the
# samples their trials use).
SOME_ROWS = np.arange(3, 2000, 7)


def load_mapped_together(barrier, prepared, mapped, results) -> None:
    """One of several processes loading the train split memory-mapped at the same moment,
    then taking SOME_ROWS of it: puts the inodes of the .npy files this process maps, and the
    inputs and rows it got."""
    from pipeline.data.loader import load_prepared
    from pipeline.data.mapped import shared_take

    barrier.wait()
    data = load_prepared(prepared, ("train",), placement="disk", mapped_dir=mapped)
    values = data.tensors["train"][0].numpy().reshape(len(data.tensors["train"][0]), -1)
    taken = shared_take(data.copies["train"], "train", SOME_ROWS, values)
    maps = Path("/proc/self/maps").read_text().splitlines()
    inodes = {line.split()[4] for line in maps if ".npy" in line}
    deleted = any(line.endswith("(deleted)") for line in maps if ".npy" in line)
    digests = [
        hashlib.sha256(values.tobytes()).hexdigest()
        for values in (data.tensors["train"][0].numpy(), taken)
    ]
    results.put((sorted(inodes), deleted, digests))


def test_processes_loading_at_once_make_the_mapped_file_once_and_share_it(tmp_path, manifest):
    """Tune's workers (or data-parallel processes) load the splits at the same moment: one
    makes the split's .npy file while the others wait for it, and all map that one file (no
    process maps a file another replaced). So with the rows they take of it: one file beside
    it, named by it and by the rows."""
    import multiprocessing

    from pipeline.data.loader import load_prepared
    from pipeline.data.mapped import file_identity

    prepared, mapped = tmp_path / "prepared", tmp_path / "mapped"
    prepared.mkdir()
    write_splits(prepared, manifest, seed=7, dtype="float64", rows=(2000, 30))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [
        context.Process(target=load_mapped_together, args=(barrier, prepared, mapped, results))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    npy = mapped / f"train-{file_identity(prepared / 'train.parquet')}.npy"
    rows = mapped / f"{npy.stem}-rows-{hashlib.sha256(SOME_ROWS.tobytes()).hexdigest()[:16]}.npy"
    inputs = load_prepared(prepared, ("train",)).tensors["train"][0].numpy()
    expected = [hashlib.sha256(a.tobytes()).hexdigest() for a in (inputs, inputs[SOME_ROWS])]
    inodes = sorted(str(path.stat().st_ino) for path in (npy, rows))
    assert got == [(inodes, False, expected)] * 3
    assert sorted(p.name for p in mapped.iterdir()) == sorted([npy.name, rows.name, "train.lock"])
