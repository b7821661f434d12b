"""``runway server migrate``: the local store's history onto the team's MLflow server.

Copied through MLflow's client on both sides (nothing reads or writes a store's tables):

- experiments, by name (made on the server when missing, with their own tags);
- runs, with name, start and end time, status, params, tags (``mlflow.parentRunId`` pointed
  at the copied parent, so trials stay nested under their tune run), every metric's whole
  history and the run's artifacts;
- logged models (MLflow 3's ``models:/m-...``) with their params, tags and files;
- registered models with description and tags, their versions in order (source and run
  pointed at the copies) and their aliases (``champion``) on the same versions.

Every copy is tagged ``runway.migrated_from`` with what it copies, and what the server already
has is skipped: running it again copies only what is new.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import StageError

MIGRATED = "runway.migrated_from"
BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics (100 params) per call


@dataclass
class Counts:
    experiments: int = 0
    runs: int = 0
    skipped_runs: int = 0
    metric_points: int = 0
    artifact_files: int = 0
    logged_models: int = 0
    versions: int = 0
    skipped_versions: int = 0
    aliases: int = 0
    registered_models: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.experiments} experiment(s), {self.runs} run(s) copied "
            f"({self.skipped_runs} already there), {self.metric_points} metric points, "
            f"{self.artifact_files} artifact file(s), {self.logged_models} logged model(s), "
            f"{len(self.registered_models)} registered model(s) with {self.versions} new "
            f"version(s) ({self.skipped_versions} already there) and {self.aliases} alias(es)"
        )


def target_uri() -> str:
    """The server: ``MLFLOW_TRACKING_URI`` (with ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``),
    else the running ``runway server``'s ``client.env``, whose values are put in this
    process's environment for MLflow's client."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        from pipeline import server

        client = server.server_dir() / "client.env"
        if not client.is_file():
            raise StageError(
                "no server to migrate to: set MLFLOW_TRACKING_URI (and _USERNAME, _PASSWORD), "
                f"or start one with `runway server start` ({client} not found)"
            )
        for line in client.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("MLFLOW_TRACKING_"):
                os.environ[key] = value
        uri = os.environ["MLFLOW_TRACKING_URI"]
    if not uri.startswith(("http://", "https://")):
        raise StageError(f"MLFLOW_TRACKING_URI={uri}: migrate copies onto a server (http://...)")
    return uri


def _pages(call: Callable, **kwargs) -> list:
    items, token = [], None
    while True:
        page = call(**kwargs, page_token=token)
        items += list(page)
        token = page.token
        if not token:
            return items


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _copy_files(download: Callable[[str], str], upload: Callable[[str], None]) -> int:
    """Download into a temporary folder, upload from it; the number of files."""
    with tempfile.TemporaryDirectory(prefix="runway-migrate-") as tmp:
        local = Path(download(tmp))
        files = [p for p in local.rglob("*") if p.is_file()]
        if files:
            upload(str(local))
        return len(files)


def migrate(source: str, target: str, echo: Callable[[str], None] = print) -> Counts:
    import mlflow
    from mlflow.entities import Metric, Param, ViewType
    from mlflow.exceptions import MlflowException

    src = mlflow.MlflowClient(source, registry_uri=source)
    dst = mlflow.MlflowClient(target, registry_uri=target)
    counts = Counts()
    try:
        dst.search_experiments(max_results=1)
    except MlflowException as exc:
        raise StageError(f"cannot use the server {target}: {server_error(exc)}") from None
    runs_map: dict[str, str] = {}
    models_map: dict[str, str] = {}
    for exp in src.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        found = dst.get_experiment_by_name(exp.name)
        own_tags = {k: v for k, v in exp.tags.items() if not k.startswith("mlflow.")}
        exp_id = found.experiment_id if found else dst.create_experiment(exp.name, tags=own_tags)
        counts.experiments += 1
        there = {
            r.data.tags[MIGRATED]: r.info.run_id
            for r in _pages(dst.search_runs, experiment_ids=[exp_id], max_results=1000)
            if MIGRATED in r.data.tags
        }
        runs = _pages(src.search_runs, experiment_ids=[exp.experiment_id], max_results=1000)
        # Parents before their nested runs; otherwise by start time.
        runs.sort(key=lambda r: ("mlflow.parentRunId" in r.data.tags, r.info.start_time or 0))
        copied = 0
        for r in runs:
            old = r.info.run_id
            if old in there:
                runs_map[old] = there[old]
                counts.skipped_runs += 1
                continue
            tags = {k: v for k, v in r.data.tags.items() if k != "mlflow.runName"}
            parent = tags.get("mlflow.parentRunId")
            if parent:
                tags["mlflow.parentRunId"] = runs_map.get(parent, parent)
            tags[MIGRATED] = old
            new = dst.create_run(
                exp_id, start_time=r.info.start_time, tags=tags, run_name=r.info.run_name
            ).info.run_id
            runs_map[old] = new
            params = [Param(k, v) for k, v in r.data.params.items()]
            for chunk in _chunks(params, 100):
                dst.log_batch(new, params=chunk)
            history = [m for key in r.data.metrics for m in src.get_metric_history(old, key)]
            for chunk in _chunks(
                [Metric(m.key, m.value, m.timestamp, m.step) for m in history], BATCH
            ):
                dst.log_batch(new, metrics=chunk)
            counts.metric_points += len(history)
            counts.artifact_files += _copy_files(
                lambda tmp, old=old: src.download_artifacts(old, "", tmp),
                lambda local, new=new: dst.log_artifacts(new, local),
            )
            if r.info.status != "RUNNING":
                dst.set_terminated(new, status=r.info.status, end_time=r.info.end_time)
            copied += 1
        counts.runs += copied
        models = _copy_logged_models(src, dst, exp.experiment_id, exp_id, runs_map, counts)
        models_map.update(models)
        echo(
            f"[migrate] experiment {exp.name}: {copied} run(s) copied, "
            f"{len(runs) - copied} already there, {len(models)} logged model(s)"
        )
    _copy_registry(src, dst, runs_map, models_map, counts, echo)
    return counts


def _copy_logged_models(src, dst, old_exp: str, new_exp: str, runs_map, counts) -> dict:
    """MLflow 3's logged models of one experiment; {old model id: new model id}."""
    from mlflow.entities import LoggedModelStatus

    there = {
        m.tags[MIGRATED]: m.model_id
        for m in _pages(dst.search_logged_models, experiment_ids=[new_exp])
        if MIGRATED in m.tags
    }
    mapping = {}
    for model in _pages(src.search_logged_models, experiment_ids=[old_exp]):
        if model.model_id in there:
            mapping[model.model_id] = there[model.model_id]
            continue
        new = dst.create_logged_model(
            new_exp,
            name=model.name,
            source_run_id=runs_map.get(model.source_run_id or "", None),
            tags={**model.tags, MIGRATED: model.model_id},
            params=model.params,
            model_type=model.model_type,
        )
        counts.artifact_files += _copy_files(
            lambda tmp, m=model: _download_model(m.artifact_location, tmp),
            lambda local, n=new: dst.log_model_artifacts(n.model_id, local),
        )
        dst.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
        mapping[model.model_id] = new.model_id
        counts.logged_models += 1
    return mapping


def _download_model(artifact_location: str, tmp: str) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_location, dst_path=tmp)


def _remap_source(source: str, runs_map: dict, models_map: dict) -> str:
    if source.startswith("models:/") and source[len("models:/") :] in models_map:
        return f"models:/{models_map[source[len('models:/') :]]}"
    if source.startswith("runs:/"):
        run_id, _, path = source[len("runs:/") :].partition("/")
        return f"runs:/{runs_map.get(run_id, run_id)}/{path}"
    return source


def _copy_registry(src, dst, runs_map, models_map, counts: Counts, echo) -> None:
    from mlflow.exceptions import MlflowException

    for rm in _pages(src.search_registered_models, max_results=1000):
        try:
            dst.get_registered_model(rm.name)
        except MlflowException:
            dst.create_registered_model(rm.name, tags=rm.tags, description=rm.description)
        counts.registered_models.append(rm.name)
        there = {
            v.tags[MIGRATED]: v.version
            for v in _pages(dst.search_model_versions, filter_string=f"name='{rm.name}'")
            if MIGRATED in v.tags
        }
        versions = sorted(
            _pages(src.search_model_versions, filter_string=f"name='{rm.name}'"),
            key=lambda v: int(v.version),
        )
        numbers: dict[str, str] = {}
        for v in versions:
            key = f"{rm.name}/{v.version}"
            if key in there:
                numbers[str(v.version)] = str(there[key])
                counts.skipped_versions += 1
                continue
            source = _remap_source(v.source, runs_map, models_map)
            created = dst.create_model_version(
                rm.name,
                source=source,
                run_id=runs_map.get(v.run_id or "", None),
                tags={**v.tags, MIGRATED: key},
                description=v.description,
                # a logged model's version names it (the server checks the two agree)
                model_id=source[len("models:/") :] if source.startswith("models:/m-") else None,
            )
            numbers[str(v.version)] = str(created.version)
            counts.versions += 1
        aliases = src.get_registered_model(rm.name).aliases
        for alias, version in aliases.items():
            dst.set_registered_model_alias(rm.name, alias, numbers[str(version)])
            counts.aliases += 1
        shown = ", ".join(
            f"{a} → version {numbers[str(v)]} (was {v})" for a, v in sorted(aliases.items())
        )
        echo(
            f"[migrate] model {rm.name}: {len(versions)} version(s)"
            + (f"; {shown}" if shown else "")
        )


def server_error(exc: BaseException) -> str:
    """One line for a failed request: 401/403 named as such, never the credentials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    code = getattr(exc, "error_code", "")
    if "401" in text or code == "UNAUTHENTICATED":
        return (
            "401 Unauthorized: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(runway server start wrote them to .runway/server/client.env)"
        )
    if "403" in text or code == "PERMISSION_DENIED":
        return "403 Forbidden: this user may not write to the server"
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return text.replace(password, "***") if password else text
