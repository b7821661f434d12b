"""MLflow conventions: where runs go, what every run is tagged with, how runs end.

The store defaults to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``;
``MLFLOW_TRACKING_URI`` points the pipeline at a team server instead. Every run carries the
git commit (and whether the tree was dirty), the DVC hash of the prepared data, the dataset
name and the stage, so a run in the UI traces back to its code, data and params.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.data.table import PREPARED_DIR
from pipeline.io import Terminated

MLRUNS_DIR = Path("mlruns")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store (as an absolute path)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    MLRUNS_DIR.mkdir(exist_ok=True)
    return f"sqlite:///{MLRUNS_DIR.resolve()}/mlflow.db"


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment's id (created if new)."""
    import mlflow

    local = not os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri())
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


def run_tags(stage: str, dataset: str, data_dir: Path | None = PREPARED_DIR) -> dict[str, str]:
    tags = {"stage": stage, "dataset": dataset, **git_info()}
    if data_dir is not None and Path(data_dir).exists():
        tags["data.dvc_md5"] = dvc_hash(data_dir)
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
    """An MLflow run that always ends: FINISHED, FAILED on an exception, KILLED on SIGTERM/^C."""
    import mlflow

    def _on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if not nested else None
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=None if run_id else run_name,
        tags=masked(tags),
        nested=nested,
    )
    status = "FAILED"
    try:
        yield active
        status = "FINISHED"
    except (Terminated, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
