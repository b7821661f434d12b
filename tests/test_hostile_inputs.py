"""Hostile inputs are refused quickly and in bounded memory, with one line naming the file: a
gzip bomb or an overflowing header named as an MNIST IDX file, and a YAML alias bomb ("billion
laughs") in params.yaml. The ``dvc repro`` tests measure the peak memory of DVC and its
stages."""

from __future__ import annotations

import gzip
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params
from pipeline.data.idx import MAX_IDX_BYTES, read_idx
from pipeline.io import StageError
from tests.conftest import ROOT, copy_project, project_env, run
from tests.formats import write_mnist

pytestmark = pytest.mark.xdist_group("hostile")

MIB = 2**20
# The peak resident memory allowed to `dvc repro ingest` and its stages while refusing a bomb
# of BOMB_BYTES: reading the bomb whole would take at least twice BOMB_BYTES.
PEAK_LIMIT = 512 * MIB
BOMB_BYTES = 1024 * MIB

# Runs the command in argv and exits with its status; the last line of stderr is the peak
# resident memory of its largest process (the command or any process it waited for).
PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"peak_rss_bytes={peak * (1 if sys.platform == 'darwin' else 1024)}", file=sys.stderr)
sys.exit(status)
"""

# IDX type codes by numpy kind and item size.
IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_header(code: int, dims: list[int]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def idx_file(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written out here independently of the reader."""
    code = IDX_CODES[f"{array.dtype.kind}{array.dtype.itemsize}"]
    return (
        idx_header(code, list(array.shape)) + array.astype(array.dtype.newbyteorder(">")).tobytes()
    )


def gzip_bomb(path: Path, head: bytes, zeros: int) -> Path:
    """A gzip file holding ``head`` then ``zeros`` zero bytes, about a thousandth of that size:
    one compressed 64 MiB member of zeros, repeated (a gzip stream may hold several members;
    readers join them)."""
    chunk = 64 * MIB
    member = gzip.compress(bytes(chunk), compresslevel=9, mtime=0)
    path.write_bytes(gzip.compress(head, mtime=0) + member * (zeros // chunk))
    return path


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed stage."""
    errors = [line for line in result.stderr.splitlines() if "] error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# --- read_idx ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_type_exactly(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (5, 4, 3)).astype(np.uint8),
        rng.integers(-128, 128, (7,)).astype(np.int8),
        np.array([[-32768, 32767], [0, -1]], dtype=np.int16),
        np.array([-(2**31), 2**31 - 1, 123456789], dtype=np.int32),
        np.array([[np.pi, -0.0], [np.inf, 1e-38]], dtype=np.float32),
        np.array([np.e, -1e300, 5e-324], dtype=np.float64),
    ]
    for i, array in enumerate(arrays):
        path = tmp_path / (f"a{i}-idx" + (".gz" if gz else ""))
        raw = idx_file(array)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        read = read_idx(path)
        assert read.dtype == array.dtype.newbyteorder("=") and read.shape == array.shape
        assert read.tobytes() == array.tobytes()  # bit for bit, -0.0 and inf included


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_refuses_truncated_and_trailing_data(tmp_path, gz):
    raw = idx_file(np.zeros((3, 4), dtype=np.uint8))
    path = tmp_path / ("x-idx2-ubyte" + (".gz" if gz else ""))

    def refused(content: bytes) -> str:
        path.write_bytes(gzip.compress(content) if gz else content)
        with pytest.raises(StageError) as caught:
            read_idx(path)
        return str(caught.value)

    assert refused(raw[:-2]) == (
        f"{path}: dimensions [3, 4] need 12 bytes of data, found 10 (truncated or corrupt file)"
    )
    found = "more" if gz else "13"
    assert refused(raw + b"\0") == (
        f"{path}: dimensions [3, 4] need 12 bytes of data, found {found} "
        "(data after the end: trailing bytes or a corrupt file)"
    )
    assert refused(raw[:9]) == f"{path}: IDX header truncated (9 bytes)"
    assert refused(b"\0\0\0\0" + raw[4:]) == f"{path}: not an IDX file (bad magic number 00000000)"


def test_read_idx_cut_gzip_stream_is_unreadable(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_file(np.arange(100, dtype=np.uint8)))[:-20])
    with pytest.raises(StageError, match=r"x-idx1-ubyte.gz: cannot read: Compressed file ended"):
        read_idx(path)


@pytest.mark.parametrize(
    "dims, claimed",
    [
        ([0xFFFFFFFF] * 4, (2**32 - 1) ** 4),  # np.prod: -17179869183 (wrapped)
        ([65536] * 4, 2**64),  # np.prod: 0, which an empty file matched
        ([2**16, 2**16 + 1], MAX_IDX_BYTES + 2**16),  # just over the limit
    ],
)
def test_read_idx_refuses_headers_claiming_too_much_before_reading(tmp_path, dims, claimed):
    path = tmp_path / "x-idx-ubyte"
    path.write_bytes(idx_header(0x08, dims))
    with pytest.raises(StageError) as caught:
        read_idx(path)
    assert str(caught.value) == (
        f"{path}: dimensions {dims} claim {claimed:,} bytes of data, more than the "
        f"{MAX_IDX_BYTES:,} an IDX file may hold (corrupt header?)"
    )


def test_read_idx_reads_a_gzip_bomb_no_further_than_its_header_says(tmp_path):
    path = gzip_bomb(tmp_path / "x-idx1-ubyte.gz", idx_header(0x08, [1000]), 256 * MIB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StageError, match=r"need 1,000 bytes of data, found more \(data after"):
        read_idx(path)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB (bytes on macOS)
    assert grown < 32 * MIB / (1 if sys.platform == "darwin" else 1024)


# --- params.yaml -------------------------------------------------------------------------


def laughs(levels: int) -> str:
    """YAML lines defining &l0 (nine strings) to &l<levels> (nine aliases of the level below):
    9**(levels + 1) strings in all."""
    lines = ["laughs:", "  - &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def bomb_params(original: str, levels: int) -> str:
    """params.yaml with ``train.lr`` set to the top of a ``levels`` deep alias bomb."""
    params = yaml.safe_load(original)
    params["train"]["lr"] = "LAUGHS"
    text = yaml.safe_dump(params, sort_keys=False).replace("LAUGHS", f"*l{levels}")
    return laughs(levels) + text


# The first alias of every bomb_params() file.
ALIAS_REFUSED = (
    "params.yaml: line 3: YAML alias *l0 is not allowed; write the value out (anchors and "
    "aliases are refused: nested ones can expand to gigabytes)"
)


def test_yaml_aliases_and_anchors_are_refused_by_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(bomb_params((ROOT / "params.yaml").read_text(), 3))
    with pytest.raises(ParamsError) as caught:
        load_params(path=path)
    assert str(caught.value) == ALIAS_REFUSED.replace("params.yaml", str(path))

    path.write_text("train: &t\n  lr: 0.1\n")
    with pytest.raises(ParamsError, match=r"params.yaml: line 1: YAML anchor &t is not allowed"):
        load_params(path=path)
    path.write_text("base: &b {lr: 0.1}\ntrain:\n  <<: *b\n")  # a merge key is an alias too
    with pytest.raises(ParamsError, match=r"params.yaml: line 3: YAML alias \*b is not allowed"):
        load_params(path=path)
    path.write_text("train:\n  optimizer: '&not_an_anchor'\n")  # quoted: only text
    with pytest.raises(ParamsError, match=r"train.optimizer: '&not_an_anchor' is not allowed"):
        load_params(path=path)


def test_an_error_message_shows_a_short_part_of_a_big_value():
    big = [[str(i) * 50 for i in range(1000)]] * 1000
    for change in ({"lr": big}, {"optimizer": big}, {"optimizer": "x" * 10_000}):
        with pytest.raises(ParamsError) as caught:
            parse_params({"train": change})
        message = str(caught.value)
        assert len(message) < 400, message
        assert message.startswith(f"params.yaml: train.{next(iter(change))}: ")


@pytest.mark.slow
def test_a_full_size_alias_bomb_is_refused_at_once(tmp_path):
    """9**9 strings (about 3 GB as text): the values were expanded to print the error (140 s,
    11 GB); now the stage stops at the first alias. Under a 1 GiB address-space limit, an
    expansion would end in MemoryError instead."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text(bomb_params((ROOT / "params.yaml").read_text(), 8))
    assert (project / "params.yaml").stat().st_size < 4000

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.params"],
        cwd=project,
        capture_output=True,
        text=True,
        preexec_fn=limit_memory if sys.platform == "linux" else None,
        env=project_env() | {"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_line(result) == f"[params] error: {ALIAS_REFUSED}"


# --- through dvc repro -------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("hostile") / "p")


def use_mnist(project: Path) -> Path:
    """params.yaml as committed but with data.source mnist, and four good MNIST files."""
    original = (ROOT / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["data"]["source"] = "mnist"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    folder = project / "data/external/mnist"
    write_mnist(folder, n_train=40, n_test=20)
    return folder


def repro_peak(project: Path, stage: str) -> tuple[subprocess.CompletedProcess, int]:
    """``dvc repro <stage>``; its result and the peak resident bytes of DVC or a stage."""
    result = run([sys.executable, "-c", PEAK_RSS, "dvc", "repro", stage], project, check=False)
    peak = int(result.stderr.rsplit("peak_rss_bytes=", 1)[1])
    return result, peak


@pytest.mark.slow
@pytest.mark.parametrize(
    "head, message",
    [
        # all zeros: the magic number is wrong from the first byte
        (b"", "not an IDX file (bad magic number 00000000)"),
        # a good header for 60,000 MNIST images, then far more data than it describes
        (
            idx_header(0x08, [60000, 28, 28]),
            "dimensions [60000, 28, 28] need 47,040,000 bytes of data, found more "
            "(data after the end: trailing bytes or a corrupt file)",
        ),
    ],
    ids=["zeros", "header-then-zeros"],
)
def test_a_gzip_bomb_named_as_mnist_stops_ingest_in_bounded_memory(project, head, message):
    folder = use_mnist(project)
    images = gzip_bomb(folder / "train-images-idx3-ubyte.gz", head, BOMB_BYTES)
    assert images.stat().st_size < 2 * MIB
    result, peak = repro_peak(project, "ingest")
    assert result.returncode != 0 and "exited with 1" in result.stderr
    assert error_line(result) == (
        f"[ingest] error: data/external/mnist/train-images-idx3-ubyte.gz: {message}"
    )
    assert peak < PEAK_LIMIT, f"peak {peak / MIB:.0f} MiB"
    assert not (project / "data/raw/samples.parquet").exists()


@pytest.mark.slow
def test_an_idx_header_overflowing_int64_stops_ingest(project):
    """4194304 × 2097152 × 2097152 = 2**64: as an int64 product that is 0, which matched the
    empty data and ended in a reshape traceback."""
    folder = use_mnist(project)
    (folder / "train-images-idx3-ubyte.gz").unlink()
    (folder / "train-images-idx3-ubyte").write_bytes(idx_header(0x08, [2**22, 2**21, 2**21]))
    result, peak = repro_peak(project, "ingest")
    assert result.returncode != 0 and "exited with 1" in result.stderr
    assert error_line(result) == (
        "[ingest] error: data/external/mnist/train-images-idx3-ubyte: dimensions "
        "[4194304, 2097152, 2097152] claim 18,446,744,073,709,551,616 bytes of data, more than "
        f"the {MAX_IDX_BYTES:,} an IDX file may hold (corrupt header?)"
    )
    assert peak < PEAK_LIMIT, f"peak {peak / MIB:.0f} MiB"
    (folder / "train-images-idx3-ubyte").unlink()


@pytest.mark.slow
def test_an_alias_bomb_in_params_yaml_stops_dvc_repro_with_one_line(project):
    """A small bomb (9**3 strings): DVC expands the aliases itself when it reads params.yaml,
    before any stage runs, taking time and memory that grow with the expanded size (measured:
    2 s more at 9**4 strings, 23 s at 9**5; at 9**9, past 5 GB and growing after two minutes)."""
    original = (ROOT / "params.yaml").read_text()
    (project / "params.yaml").write_text(bomb_params(original, 2))
    result, peak = repro_peak(project, "params")
    assert result.returncode != 0 and "exited with 1" in result.stderr
    assert error_line(result) == f"[params] error: {ALIAS_REFUSED}"
    assert peak < PEAK_LIMIT, f"peak {peak / MIB:.0f} MiB"
