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

Which project's store (:func:`store_dir`): the ``mlruns/`` of the working directory, except
inside the temporary copy of the repository that ``dvc exp run --queue`` / ``--temp`` runs a
pipeline in, ``<root>/.dvc/tmp/exps/<tmpdir>/``: that copy has no ``mlruns/`` of its own (it is
git-ignored) and is deleted afterwards, so its stages log to ``<root>/mlruns/``. ``<root>`` is
``DVC_ROOT``, which DVC sets for every stage command to the repository it was started in (the
original one for a queued experiment), when the working directory lies under
``$DVC_ROOT/.dvc/tmp/exps/``; else, with no such ``DVC_ROOT``, the folder above
``.dvc/tmp/exps/`` in the working directory's path. Anywhere else ``DVC_ROOT`` is ignored.

A moved or copied project (:func:`relocate_store`): MLflow keeps absolute artifact paths in
the store (each experiment's artifact location, each run's artifact URI, each model version's
and logged model's storage location), and has no API to change them; a store copied with its
project would still send new artifacts to the old project's ``mlruns/artifacts``. So, for the
local store, :func:`setup` checks every experiment's artifact location; one that is another
folder's ``mlruns/artifacts`` has its paths rewritten in one sqlite transaction, from
``<old>/mlruns/`` to this project's ``mlruns/`` (only paths under that prefix), and says so in
one line, provided the artifacts were copied too (every model's files, and every run folder the
old place still has, exist here); else the stage stops with one line saying what to copy.
``runway store relocate`` does the same on its own.
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
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.data.table import PREPARED_DIR
from pipeline.io import StageError, Terminated, env_scope

MLRUNS_DIR = Path("mlruns")
# Where DVC makes the temporary copies of a repository that queued experiments run in
# (dvc/repo/experiments: `<repo>/.dvc/tmp` + EXEC_TMP_DIR "exps", then a mkdtemp folder).
EXPS_TMP = Path(".dvc", "tmp", "exps")


def experiment_root(cwd: Path | None = None) -> Path | None:
    """The original repository when ``cwd`` (default: the working directory) is inside DVC's
    temporary copy of it, ``<root>/.dvc/tmp/exps/<tmpdir>/...``; None anywhere else."""
    here = (cwd or Path.cwd()).resolve()
    env_root = os.environ.get("DVC_ROOT")
    if env_root:
        root = Path(env_root).resolve()
        exps = root / EXPS_TMP
        if here != exps and here.is_relative_to(exps):
            return root
    for parent in here.parents:
        if parent.parts[-len(EXPS_TMP.parts) :] == EXPS_TMP.parts:
            return parent.parents[len(EXPS_TMP.parts) - 1]
    return None


def store_dir(cwd: Path | None = None) -> Path:
    """This project's ``mlruns/``: ``mlruns`` (relative), or ``<root>/mlruns`` inside DVC's
    temporary copy of ``<root>`` (see :func:`experiment_root`)."""
    root = experiment_root(cwd)
    return root / MLRUNS_DIR if root is not None else MLRUNS_DIR


def tracking_uri(create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store (as an absolute path).

    ``create=False`` leaves a missing ``mlruns/`` missing (for commands that only look)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    mlruns = store_dir()
    if create:
        mlruns.mkdir(exist_ok=True)
    return f"sqlite:///{mlruns.resolve()}/mlflow.db"


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


# Columns that hold an absolute artifact path (a file: URI or a plain path) of the local
# store, as (table, column, extra condition): what relocate_store rewrites.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location", ""),
    ("runs", "artifact_uri", ""),
    ("model_versions", "storage_location", ""),
    ("model_versions", "source", ""),
    ("logged_models", "artifact_location", ""),
    ("trace_tags", "value", "key = 'mlflow.artifactLocation'"),
)
# Locations that hold a model's files: they must be here before paths are pointed here.
MODEL_COLUMNS = {("model_versions", "storage_location"), ("logged_models", "artifact_location")}
WHAT = {
    "experiments": "experiment",
    "runs": "run",
    "model_versions": "model version",
    "logged_models": "logged model",
    "trace_tags": "trace",
}


def local_path(location: str) -> Path | None:
    """The local path of a ``file:`` URI or an absolute plain path; None for anything else."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if not parsed.scheme and location.startswith("/"):
        return Path(location)
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def foreign_stores(locations: list[str], mlruns: Path) -> list[Path]:
    """The ``mlruns/`` folders other than ``mlruns`` whose ``artifacts/`` are the artifact
    location of an experiment (of a project this one was moved or copied from)."""
    here = mlruns.resolve()
    found: list[Path] = []
    for location in locations:
        path = local_path(location)
        if path is None or path.name != "artifacts" or path.parent.name != MLRUNS_DIR.name:
            continue  # a server's, a bucket's, or one set by hand: not a moved project's
        if not _same(path.parent, here) and path.parent not in found:
            found.append(path.parent)
    return sorted(found)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def relocate_store(mlruns: Path | None = None, dry_run: bool = False) -> str | None:
    """Point the local store's absolute artifact paths that lie under another project's
    ``mlruns/`` (the one this project was moved or copied from) at ``mlruns`` (default:
    :func:`store_dir`), in one transaction; return the line that says what was rewritten, or
    None when there was nothing to rewrite. Raise :class:`StageError` (nothing changed) when
    the artifacts under the old paths were not copied here.

    The experiments' locations are read with MLflow's client; MLflow has no API to change
    them, so the rows are rewritten with sqlite: only the :data:`LOCATION_COLUMNS` values that
    start with ``<old>/mlruns/`` (as a ``file:`` URI or a plain path)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    mlruns = (mlruns or store_dir()).resolve()
    path = mlruns / "mlflow.db"
    if not path.is_file():
        return None
    uri = f"sqlite:///{path}"
    check_store(uri)
    with store_errors(uri):
        experiments = MlflowClient(tracking_uri=uri).search_experiments(view_type=ViewType.ALL)
    olds = foreign_stores([e.artifact_location for e in experiments], mlruns)
    if not olds:
        return None
    store = shown(path)
    new_artifacts = mlruns / "artifacts"
    conn = sqlite3.connect(path, timeout=lock_timeout(), isolation_level=None)
    try:
        columns = {
            (table, column, where)
            for table, column, where in LOCATION_COLUMNS
            if column in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        }
        conn.execute("BEGIN IMMEDIATE")
        counts: dict[str, set] = {}
        missing: list[Path] = []
        for old in olds:
            for old_prefix, new_prefix in (
                (old.as_uri() + "/", mlruns.as_uri() + "/"),
                (f"{old}/", f"{mlruns}/"),
            ):
                n = len(old_prefix)
                for table, column, where in sorted(columns):
                    condition = f"substr({column}, 1, ?) = ?" + (f" AND {where}" if where else "")
                    rows = conn.execute(
                        f"SELECT rowid, {column} FROM {table} WHERE {condition}", (n, old_prefix)
                    ).fetchall()
                    for rowid, value in rows:
                        was, now = local_path(value), local_path(new_prefix + value[n:])
                        must = (table, column) in MODEL_COLUMNS or (
                            was is not None and was.exists()
                        )
                        if must and now is not None and not now.exists():
                            missing.append(now)
                        counts.setdefault(table, set()).add(rowid)
                    if rows and not dry_run:
                        conn.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE {condition}",
                            (new_prefix, n + 1, n, old_prefix),
                        )
        if missing:
            conn.execute("ROLLBACK")
            old = olds[0] / "artifacts"
            if old.is_dir():
                todo = f"copy them (`cp -a {old}/. {new_artifacts}/`) and run again"
            else:
                todo = f"{old} is gone: put its files in {shown(new_artifacts)}/ and run again"
            lost = sorted(set(missing))
            raise StageError(
                f"{store} keeps its artifacts in {old}, not in this project's "
                f"{new_artifacts}, and {len(lost)} of them {'is' if len(lost) == 1 else 'are'} "
                f"not here ({shown(lost[0])}): {todo}; or move the store aside "
                f"(`mv {shown(mlruns)} {shown(mlruns)}.old`) to start a new one"
            )
        conn.execute("ROLLBACK" if dry_run else "COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        kind, detail = _problem(exc) or ("other", str(exc))
        raise StageError(store_message(path, kind, detail)) from None
    finally:
        conn.close()
    what = ", ".join(_plural(len(counts[t]), WHAT[t]) for t in WHAT if counts.get(t))
    was = " and ".join(str(old.parent) for old in olds)
    verb = "would point" if dry_run else "now point"
    return (
        f"{store} pointed at the artifacts of {was} (the project was moved or copied): "
        f"its paths {verb} at {new_artifacts} ({what})"
    )


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment's id (created if new).

    The local store of a project that was moved or copied is pointed at this project's
    artifacts first (:func:`relocate_store`), saying so in one line."""
    import mlflow

    local = not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    logging.getLogger("mlflow.store.db.utils").addFilter(_hide_converted)
    check_store(uri)
    if local:
        line = relocate_store()
        if line:
            print(line, file=sys.stderr, flush=True)
    with store_errors(uri):
        mlflow.set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        artifacts = (store_dir() / "artifacts").resolve().as_uri() if local else None
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


def log_values(rows: list[dict]) -> None:
    """Log the values a run trains with (rows of :func:`pipeline.config.provenance`) to the
    active MLflow run: each under its params.yaml path (``train.lr``), ``params.tuned`` and
    ``params.defaults`` (the keys that tuning decided and those params.yaml leaves to their
    defaults), ``requested.<key>`` where params.yaml asks for another value than the one
    used, and every row, requested value and source included, as the artifact
    ``params.json``."""
    import mlflow

    logged: dict[str, object] = {row["key"]: row["effective"] for row in rows}
    for source, name in (("tuned", "params.tuned"), ("default", "params.defaults")):
        keys = [row["key"] for row in rows if row["source"] == source]
        logged[name] = ", ".join(keys) or "none"
    logged |= {
        f"requested.{row['key']}": row["requested"]
        for row in rows
        if row["requested"] is not None and row["requested"] != row["effective"]
    }
    log_params(logged)
    mlflow.log_dict(rows, "params.json")


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as floats; refuse NaN/±inf, which MLflow would store as ±1.8e308."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"refusing to log non-finite metrics: {bad}")
    return {k: float(v) for k, v in metrics.items()}


# MLflow's setting (whole seconds) for how long its asynchronous logging gathers metrics.
ASYNC_BUFFERING = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"


@contextmanager
def async_metrics() -> Iterator[None]:
    """A block that logs asynchronously (``MLFlowLogger(synchronous=False)``), with every
    metric stored when it ends. MLflow's logging thread otherwise waits on its queue for up
    to a second at a time, and the flush waits for that wait to end: about half a second
    more for every training. With ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` (1 unless the
    environment sets it) the thread waits on the flag the flush raises instead, and each
    second's metrics go to the store in one request."""
    import mlflow

    with env_scope({} if os.environ.get(ASYNC_BUFFERING) else {ASYNC_BUFFERING: "1"}):
        yield
        mlflow.flush_async_logging()


@contextmanager
def run(
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    run_id: str | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run that always ends: FINISHED, FAILED on an exception, KILLED on SIGTERM/^C.

    ``nested`` runs under the active run, or under ``parent_run_id`` (a run another process
    started: a tune worker's trial under the study's tune run).

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
                parent_run_id=parent_run_id,
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
