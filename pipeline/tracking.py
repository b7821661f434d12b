"""MLflow conventions: where runs go, what every run is tagged with, how runs end.

The store defaults to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` points the pipeline at a team server instead. Every run carries the
git commit (and whether the tree was dirty), the DVC hash of the prepared data, the dataset
name and the stage, so a run in the UI traces back to its code, data and params.

A sqlite store held locked by another process is waited for up to ``RUNWAY_MLFLOW_LOCK_TIMEOUT``
seconds (default 60) when a stage opens it and before each run starts; a store still locked
after that, or one that is not a readable sqlite file, stops the stage with one line naming the
file and what to do (:func:`check_store`, :func:`store_errors`). The wait is an environment
variable, not a params key: it changes no result, so changing it must not rerun stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, Terminated

MLRUNS_DIR = Path("mlruns")


def tracking_uri(create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store (as an absolute path).

    ``create=False`` leaves a missing ``mlruns/`` missing (for commands that only look)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if create:
        MLRUNS_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{MLRUNS_DIR.resolve()}/mlflow.db"


LOCK_TIMEOUT_ENV = "RUNWAY_MLFLOW_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0


def lock_timeout() -> float:
    """Seconds to wait for a sqlite store that another process holds locked."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise StageError(
            f"{LOCK_TIMEOUT_ENV}={raw!r}: expected a number of seconds >= 0 "
            f"(unset: {DEFAULT_LOCK_TIMEOUT:g})"
        )
    return value


def store_file(uri: str | None = None) -> Path | None:
    """The sqlite file behind a ``sqlite:///`` tracking URI; None for a server or memory."""
    uri = uri or tracking_uri(create=False)
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def shown(path: Path) -> str:
    """``path`` as a user would type it here: relative to the working directory if inside."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _sqlite_error(exc: BaseException | None) -> sqlite3.Error | None:
    """The sqlite3 error under an MLflow or SQLAlchemy exception, if there is one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.Error):
            return exc
        orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError.orig: the driver's error
        if isinstance(orig, sqlite3.Error):
            return orig
        exc = exc.__cause__ or exc.__context__
    return None


def _problem(exc: BaseException | None) -> tuple[str, str] | None:
    """("locked" | "corrupt", sqlite's message) when ``exc`` comes from an unusable store."""
    error = _sqlite_error(exc)
    if error is None:
        return None
    name = getattr(error, "sqlite_errorname", "") or ""
    detail = str(error).splitlines()[0] if str(error) else name
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "locked", detail
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return "corrupt", detail
    return None


def store_message(path: Path, kind: str, detail: str, waited: float | None = None) -> str:
    """The one line that says what is wrong with the store file and what to do."""
    where = shown(path)
    if kind == "locked":
        how_long = (
            f" (waited {waited:g} s; {LOCK_TIMEOUT_ENV} sets the wait)"
            if waited is not None
            else ""
        )
        return (
            f"{where} is locked by another process{how_long}: let that process finish or "
            f"stop it (`lsof {where}` names it), then run again"
        )
    if kind == "corrupt":
        artifacts = shown(path.parent / "artifacts")
        return (
            f"{where} is not a readable MLflow store ({detail}): move it aside "
            f"(`mv {where} {where}.broken`) and run again; a new empty store is made, the "
            f"artifacts under {artifacts}/ stay, and `dvc repro` logs only the stages it "
            "reruns (`dvc repro -f` runs and logs them all)"
        )
    return f"{where}: cannot use the MLflow store ({detail})"


def check_store(uri: str | None = None, timeout: float | None = None) -> None:
    """Wait up to ``timeout`` seconds (default: :func:`lock_timeout`) for a sqlite store that
    another process holds locked, and make sure it is a readable sqlite file; raise
    :class:`StageError` naming the file if not. Nothing to check for a server or a store
    that does not exist yet (MLflow creates it)."""
    path = store_file(uri)
    if path is None or not path.is_file():
        return
    timeout = lock_timeout() if timeout is None else timeout
    try:
        # mode=rw: never create the file; BEGIN IMMEDIATE waits (sqlite's busy timeout) for
        # the write lock that another process's transaction holds, as MLflow's writes would.
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout, isolation_level=None
        )
    except sqlite3.Error as exc:
        raise StageError(f"{shown(path)}: cannot open the MLflow store ({exc})") from None
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        kind, detail = _problem(exc) or ("other", str(exc))
        raise StageError(store_message(path, kind, detail, waited=timeout)) from None
    finally:
        conn.close()


def _hide_converted(record: logging.LogRecord) -> bool:
    """Logging filter: drop MLflow's logged traceback of a store error that
    :func:`store_errors` turns into one line."""
    return not (record.exc_info and _problem(record.exc_info[1]))


@contextmanager
def store_errors(uri: str | None = None, mlflow_only: bool = False) -> Iterator[None]:
    """Turn an error from an unusable sqlite store (locked, not a database, malformed) into
    a one-line :class:`StageError` naming the file. ``mlflow_only``: convert only errors that
    MLflow raised (code that also uses other sqlite files, like Optuna's, keeps its own)."""
    try:
        yield
    except StageError:
        raise
    except Exception as exc:
        problem = _problem(exc)
        path = store_file(uri)
        if problem is None or path is None:
            raise
        if mlflow_only:
            from mlflow.exceptions import MlflowException

            if not isinstance(exc, MlflowException):
                raise
        raise StageError(store_message(path, *problem)) from None


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment's id (created if new)."""
    import mlflow

    local = not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    logging.getLogger("mlflow.store.db.utils").addFilter(_hide_converted)
    check_store(uri)
    with store_errors(uri):
        mlflow.set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        artifacts = (MLRUNS_DIR / "artifacts").resolve().as_uri() if local else None
        return mlflow.create_experiment(experiment, artifact_location=artifacts)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, str]:
    """Commit and dirty flag (dvc.lock and reports/, rewritten by the pipeline, excluded)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    status = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!reports"
    )
    return {"git.commit": commit, "git.dirty": str(bool(status)).lower()}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_hash(path: Path | str) -> str:
    """The md5 DVC records for a file or directory output (same value as in dvc.lock)."""
    path = Path(path)
    if path.is_file():
        return _md5(path)
    entries = [
        {"md5": _md5(f), "relpath": f.relative_to(path).as_posix()}
        for f in path.rglob("*")
        if f.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


# What DVC puts in a stage's environment under `dvc exp run` (dvc.env), tagged on every run.
DVC_EXP_ENV = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}


def run_tags(
    stage: str, dataset: str, data_dir: Path | None = PREPARED_DIR, data_tag: str = "data.dvc_md5"
) -> dict[str, str]:
    """The tags every run carries: stage, dataset, git commit, the DVC hash of the data it
    read (under ``data_tag``) and, under `dvc exp run`, the experiment's name and baseline."""
    tags = {"stage": stage, "dataset": dataset, **git_info()}
    if data_dir is not None and Path(data_dir).exists():
        tags[data_tag] = dvc_hash(data_dir)
    tags.update({tag: os.environ[env] for env, tag in DVC_EXP_ENV.items() if os.environ.get(env)})
    return tags


# Keys whose values are credentials, and credentials inside values (URL user:password,
# ?token=... query parameters, bearer tokens).
SECRET_KEY = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|credential|auth", re.I)
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@", re.I)
QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:[^=&\s]*(?:token|secret|password|passwd|key|sig|signature)[^=&\s]*)=)"
    r"[^&\s]+",
    re.I,
)
BEARER = re.compile(r"(?P<key>bearer\s+)[a-z0-9._~+/=-]+", re.I)
MASK = "***"


def mask_value(value: Any) -> str:
    """The value as text, with any credential inside it replaced by ***."""
    text = str(value)
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
    return BEARER.sub(lambda m: f"{m['key']}{MASK}", text)


def masked(values: Mapping[str, Any]) -> dict[str, str]:
    """Params or tags safe to log: credential-named keys get ***, values are scrubbed."""
    return {
        k: MASK if SECRET_KEY.search(k.rsplit(".", 1)[-1]) else mask_value(v)
        for k, v in values.items()
    }


def log_params(params: Mapping[str, Any]) -> None:
    """``mlflow.log_params`` with credentials masked."""
    import mlflow

    mlflow.log_params(masked(params))


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as floats; refuse NaN/±inf, which MLflow would store as ±1.8e308."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"refusing to log non-finite metrics: {bad}")
    return {k: float(v) for k, v in metrics.items()}


@contextmanager
def run(
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    run_id: str | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    """An MLflow run that always ends: FINISHED, FAILED on an exception, KILLED on SIGTERM/^C.

    A store that is locked or unreadable, when the run starts or while it logs, stops the
    stage with one line naming the file (see :func:`store_errors`); so does a ``run_id`` that
    this store does not have."""
    import mlflow
    from mlflow.exceptions import MlflowException

    def _on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    uri = mlflow.get_tracking_uri()
    check_store(uri)
    with store_errors(uri):
        try:
            active = mlflow.start_run(
                run_id=run_id,
                experiment_id=experiment_id,
                run_name=None if run_id else run_name,
                tags=masked(tags),
                nested=nested,
            )
        except MlflowException as exc:
            path = store_file(uri)
            if run_id is None or exc.error_code != "RESOURCE_DOES_NOT_EXIST" or path is None:
                raise
            raise StageError(
                f"MLflow run {run_id} is not in {shown(path)} (the store was replaced, or the "
                "run was logged to another one): `dvc repro -f` runs every stage again and "
                "logs new runs"
            ) from None
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if not nested else None
    status = "FAILED"
    failing = False
    try:
        with store_errors(uri, mlflow_only=True):
            yield active
        status = "FINISHED"
    except (Terminated, KeyboardInterrupt):
        status = "KILLED"
        failing = True
        raise
    except BaseException:
        failing = True
        raise
    finally:
        try:
            with store_errors(uri):
                mlflow.end_run(status)
        except StageError:
            if not failing:  # else the error already on its way says more
                raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
