"""Atomic file writes and the one-line failure exit every stage uses.

A stage writes each output to a temporary file beside it and moves it into place with
``os.replace``, so a reader (or the next stage) never sees a half-written file. Temporary
names carry the writer's process id; leftovers of a killed writer (SIGKILL leaves no chance to
clean up) are removed by the next write of the same path.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_leftovers(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by writers that no longer run."""
    prefix = f".{path.name}."
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
        rest = leftover.name[len(prefix) :]
        pid = rest.split(".", 1)[0]
        if rest == "old" or (pid.isdigit() and not _alive(int(pid)) and rest.endswith(".tmp")):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory; replace ``path`` with it if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


class StageError(RuntimeError):
    """An expected failure: bad data, bad params, a missing input. Printed as one line."""


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (see tracking.run)."""


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main(); on an expected failure print one clear line and exit 1."""
    from pipeline.config import ParamsError

    try:
        main()
    except (StageError, ParamsError) as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"[{name}] terminated", file=sys.stderr)
        sys.exit(143)


def load_error(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one short phrase.

    torch's own message suggests retrying with ``weights_only=False``, which would execute
    whatever the file contains; Runway never does that, so the phrase says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return f"refused: it needs pickle to load ({line.rstrip('.')})"
    first = lines[0] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"
