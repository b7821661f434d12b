"""Atomic file writes, the one-line failure exit every stage uses, and what keeps two runs of
a stage apart.

A stage writes each output to a temporary file beside it and moves it into place with
``os.replace``, so a reader (or the next stage) never sees a half-written file. A directory
output is swapped with its new version in one step (Linux's ``renameat2(RENAME_EXCHANGE)``),
so there is no moment when neither exists; where that call is missing, the old directory is
moved aside to ``.<name>.old`` first and put back by the next write if the writer died between
the two moves. Temporary names carry the writer's process id; leftovers of a killed writer
(SIGKILL leaves no chance to clean up) are removed by the next write of the same path.

A stage run by ``dvc repro`` ends (SIGTERM) when the ``dvc`` process dies, rather than run on
alone beside the next ``dvc repro`` (:func:`stop_with_dvc`); state that only one run may use
at a time is held with :func:`exclusive`.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
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


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _clear_leftovers(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by writers that no longer run; put back a
    previous output that a writer killed mid-swap left moved aside."""
    if _old(path).exists() and not path.exists():
        os.replace(_old(path), path)
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


def clear_dead_writes(folder: Path, pattern: str) -> None:
    """Remove the temporary files of :func:`atomic_path` for paths in ``folder`` whose names
    match ``pattern`` (a glob) and whose writers no longer run (killed mid-write), including
    those of paths never written since."""
    for leftover in folder.glob(f".{pattern}.*.tmp"):
        pid = leftover.name.rsplit(".", 3)[1]  # .{name}.{pid}.{random}.tmp
        if pid.isdigit() and not _alive(int(pid)) and leftover.is_file():
            leftover.unlink(missing_ok=True)


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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # file system or kernel lacks it
        return False
    raise OSError(code, os.strerror(code), str(a))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished directory ``tmp`` at ``path``; ``tmp`` then holds the previous one."""
    if not path.exists():
        os.replace(tmp, path)
    elif not exchange(tmp, path):
        # Two moves: a kill between them leaves the previous output at .<name>.old, which
        # the next write of ``path`` puts back (see _clear_leftovers).
        os.replace(path, _old(path))
        os.replace(tmp, path)
        os.replace(_old(path), tmp)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory; replace ``path`` with it if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _swap_in(tmp, path)
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


# The signals by which a user or a job runner stops a command.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_signals_handled(handler) -> Iterator[None]:
    """While entered, :data:`STOP_SIGNALS` go to ``handler``. Outside the main thread, where
    handlers cannot be set (signals reach the main thread anyway), nothing changes; nor does
    a signal ignored already, or one whose handler was not set from Python (that one could
    not be put back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, handler)
        for signum in STOP_SIGNALS
        if signal.getsignal(signum) not in (None, signal.SIG_IGN)
    }
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextmanager
def signals_held() -> Iterator[None]:
    """While entered, a further ^C, SIGTERM or SIGHUP is ignored, in this process and in the
    children it starts meanwhile: for cleanup on the way out after the first stop (stopping
    a server, removing scratch files), which a second ^C would otherwise cut short, leaving
    them behind. Each cleanup step it covers must be bounded in time."""
    with stop_signals_handled(signal.SIG_IGN):
        yield


@contextmanager
def signals_deferred() -> Iterator[None]:
    """While entered, a ^C, SIGTERM or SIGHUP is recorded, and the first one is raised again
    on leaving, for its handler to act on then: for a step whose result the cleanup needs,
    such as starting a process whose pid it must know. Children started meanwhile get the
    default handlers (a handler set from Python does not survive ``exec``)."""
    came: list[int] = []
    with stop_signals_handled(lambda signum, frame: came.append(signum)):
        yield
    if came:
        signal.raise_signal(came[0])


@contextmanager
def exclusive(path: Path | str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (``flock``, created if missing) for the block.

    The holder writes its process id into the file. A second process stops at once with a
    StageError naming the holder, having changed nothing (the file is opened, never
    truncated, by a process that does not get the lock). The kernel releases the lock when
    its holder exits, however it dies, so a killed run never leaves a stale lock behind."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if holder.isdigit():
                raise StageError(
                    f"{what} is in use by another run (pid {holder}, lock {path}): wait for it "
                    f"to finish, or stop it with `kill {holder}` and run again"
                ) from None
            raise StageError(
                f"{what} is in use by another run (lock {path}): wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


_PR_SET_PDEATHSIG = 1


def _parent_of(pid: int) -> int | None:
    """The parent process id of ``pid`` (Linux /proc), or None if it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after the command name: state, ppid


def _is_dvc_shell(pid: int) -> bool:
    """Whether ``pid`` runs the shell DVC runs stage commands with (``$SHELL``, else
    ``/bin/sh``): a shell that did not exec the command (dash does not, bash does) stays
    between ``dvc`` and the stage."""
    shell = shutil.which(os.environ.get("SHELL") or "/bin/sh")
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return shell is not None and os.path.realpath(shell) == os.path.realpath(exe)


def _sigterm_when_gone(pidfd: int) -> None:
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)  # readable once the process has exited
    poll.poll()
    os.kill(os.getpid(), signal.SIGTERM)


def stop_with_dvc() -> bool:
    """Under ``dvc repro`` (DVC puts ``DVC_STAGE`` in a stage command's environment), have
    this process receive SIGTERM when the ``dvc`` process running it dies, so a stage whose
    ``dvc`` was killed stops (through its usual SIGTERM path) instead of running on beside
    the next ``dvc repro``. Returns False if ``dvc`` is gone already.

    The kernel sends it when the parent dies (``prctl(PR_SET_PDEATHSIG)``). DVC runs the
    command with ``$SHELL -c``; where that shell stays as the parent (dash does), its parent,
    ``dvc``, is watched too, through a pidfd that a daemon thread waits on. Outside DVC (a
    stage run by hand, under nohup) and where Linux's calls are missing, nothing is done."""
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return True
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return True
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return True
    if os.getppid() != parent or parent == 1:  # it died before the request took effect
        return False
    if _is_dvc_shell(parent) and hasattr(os, "pidfd_open"):
        dvc = _parent_of(parent)
        if dvc is None:
            return True
        try:
            pidfd = os.pidfd_open(dvc)
        except OSError:  # gone already, or a kernel without pidfds
            return _parent_of(parent) == dvc and dvc != 1
        if _parent_of(parent) != dvc or dvc == 1:  # the shell was re-parented: dvc is gone
            os.close(pidfd)
            return False
        threading.Thread(
            target=_sigterm_when_gone, args=(pidfd,), name="stop-with-dvc", daemon=True
        ).start()
    return True


def require(path: Path | str, stage: str) -> Path:
    """``path`` if it exists, else the error that says which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run the {stage} stage first")
    return path


def _write_params_read(name: str) -> None:
    from pipeline.config import READS_ENV, params_read

    folder = os.environ.get(READS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / f"{name}.json", sorted(params_read()))


# Nothing leaves this machine: no usage telemetry from MLflow or Great Expectations.
NO_TELEMETRY = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    # With a server, MLflow prints a "View run ... at: http://..." line for every run it ends
    # (one per tuning trial): the stages say where their runs are themselves.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class DroppedInterrupts:
    """While entered, the stage's ``sys.unraisablehook``: a ^C whose KeyboardInterrupt is
    raised where Python cannot raise it (a weakref or garbage-collection callback, a
    ``__del__``: Python prints "Exception ignored in …" and drops it) is sent again, so that
    it stops the stage as any ^C does. Anything else goes to the hook found.

    The hook only sets an event; a thread of its own sends SIGINT to the main thread
    ``RESEND_AFTER_S`` later, once the hook has returned (a signal sent from the hook would
    run the handler inside it, where its KeyboardInterrupt would be dropped again), and wakes
    it from a blocking call. None is sent once the block has ended."""

    RESEND_AFTER_S = 0.05

    def __init__(self) -> None:
        self.dropped = threading.Event()
        self.lock = threading.Lock()
        self.ended = False
        self.previous = sys.unraisablehook

    def hook(self, unraisable) -> None:
        interrupt = unraisable.exc_type is not None and issubclass(
            unraisable.exc_type, KeyboardInterrupt
        )
        if interrupt and hasattr(signal, "pthread_kill"):  # not on Windows
            self.dropped.set()
        else:
            self.previous(unraisable)

    def resend(self, main: int) -> None:
        while self.dropped.wait():
            time.sleep(self.RESEND_AFTER_S)
            self.dropped.clear()
            with self.lock:
                if self.ended:
                    return
                signal.pthread_kill(main, signal.SIGINT)

    def __enter__(self) -> DroppedInterrupts:
        main = threading.main_thread().ident
        threading.Thread(target=self.resend, args=(main,), daemon=True).start()
        sys.unraisablehook = self.hook
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.ended = True
        sys.unraisablehook = self.previous


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main() as the stage process; on an expected failure print one clear
    line and exit 1 (130 on ^C, 143 on SIGTERM)."""
    from pipeline.config import ParamsError

    for key, value in NO_TELEMETRY.items():
        os.environ.setdefault(key, value)
    with DroppedInterrupts():
        try:
            if not stop_with_dvc():
                raise Terminated("the dvc process that started this stage has exited")
            main()
        except (StageError, ParamsError) as exc:
            print(f"[{name}] error: {exc}", file=sys.stderr)
            sys.exit(1)
        except FileNotFoundError as exc:  # an input no check above named: still one line
            print(f"[{name}] error: {exc.filename or exc}: file not found", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(f"[{name}] interrupted", file=sys.stderr)
            sys.exit(130)
        except Terminated as exc:
            print(f"[{name}] terminated" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
            sys.exit(143)
        finally:
            _write_params_read(name)


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


def set_env(values: dict[str, str | None]) -> None:
    """Set each variable; ``None`` removes it."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def env_scope(values: dict[str, str | None]) -> Iterator[None]:
    """:func:`set_env` for the duration of the block; then the previous values are back."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        set_env(values)
        yield
    finally:
        set_env(saved)
