"""``runway retrain``: the one command CI runs (and a person can): pull, say what changed,
reproduce, report, push.

1. ``dvc pull`` from the default DVC remote when one is configured;
2. ``dvc status``: what changed since dvc.lock recorded the last run (data, params keys,
   code); nothing → "nothing to retrain", exit 0;
3. ``dvc repro`` (``dvc exp run -S key=value`` with ``--set``), its output shown as it comes,
   with each stage's wall time;
4. ``reports/retrain.md`` and the same as a self-contained ``reports/retrain.html`` (images
   inlined), written whether the run succeeded or not;
5. ``dvc push`` when the run succeeded and a remote is configured.

The exit status is the pipeline's: 0 when every stage succeeded (promoted or not), non-zero
when one failed (the report says which and why).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPORT_MD = Path("reports/retrain.md")
REPORT_HTML = Path("reports/retrain.html")
MARKER = "<!-- runway-retrain -->"  # finds the PR comment to update
RUNNING = re.compile(r"^Running stage '([\w-]+)':")
ERROR_LINE = re.compile(r"^\[([\w-]+)\] error: (.*)$")


class RetrainError(RuntimeError):
    """A step before the pipeline (pull, status) that cannot go on: one line."""


def dvc(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """``dvc <args>`` in this project, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], capture_output=True, text=True, timeout=timeout
    )


def first_line(text: str) -> str:
    """DVC's error as one line: its ERROR line, with the targets it lists after it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("ERROR")]
    if not errors:
        return (lines or ["no message"])[0]
    first = errors[0]
    message = lines[first].removeprefix("ERROR: ")
    targets = []
    for line in lines[first + 1 :]:
        if line.startswith(("Is your cache", "<http", "ERROR", "WARNING")):
            break
        targets.append(line)
    return message + (" " + ", ".join(targets) if targets else "")


def default_remote() -> tuple[str, str] | None:
    """(name, url) of the default DVC remote, None when none is configured."""
    done = dvc("remote", "default")
    name = done.stdout.strip()
    if done.returncode != 0 or not name:  # "No default remote set", exit 1
        return None
    url = dvc("config", f"remote.{name}.url").stdout.strip()
    return name, url


def pull(remote: tuple[str, str]) -> None:
    name, url = remote
    done = dvc("pull")
    if done.returncode != 0:
        missing = (
            "; the remote lacks these outputs: push them from where they were made"
            if ("Checkout failed" in done.stderr)
            else ""
        )
        raise RetrainError(
            f"dvc pull from remote {name!r} ({url}) failed: {first_line(done.stderr)}{missing}"
        )


def push(remote: tuple[str, str]) -> str:
    name, url = remote
    done = dvc("push")
    if done.returncode != 0:
        raise RetrainError(f"dvc push to remote {name!r} ({url}) failed: {first_line(done.stderr)}")
    return first_line(done.stdout)


def check_params() -> None:
    """Run the ``params`` stage (it checks params.yaml, in about a second): its marker file
    is not cached, so a fresh clone lacks it, and every stage would look out of date."""
    done = dvc("repro", "params", timeout=300)
    if done.returncode != 0:
        found = [m for line in done.stdout.splitlines() if (m := ERROR_LINE.match(line.strip()))]
        raise RetrainError(found[0][2] if found else first_line(done.stderr))


@dataclass
class Outcome:
    """What the pipeline run did."""

    changes: list[str]
    command: list[str]
    returncode: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None
    error: str | None = None
    seconds: float = 0.0
    hashes_before: dict[str, str] = field(default_factory=dict)  # data path -> md5, dvc.lock
    champion: dict = field(default_factory=dict)  # before the run: see champion_before()


def reproduce(command: list[str], changes: list[str], model_name: str) -> Outcome:
    """Run ``command`` (dvc repro / dvc exp run), echoing its output, timing each stage;
    what the report compares with (data hashes, the champion) is read first."""
    outcome = Outcome(changes, command, hashes_before=data_hashes())
    outcome.champion = champion_before(model_name)
    start = time.monotonic()
    current, since = None, start
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        now = time.monotonic()
        if found := RUNNING.match(line):
            if current is not None:
                outcome.stage_seconds[current] = now - since
            current, since = found[1], now
        elif found := ERROR_LINE.match(line.strip()):
            outcome.failed_stage, outcome.error = found[1], found[2]
    outcome.returncode = proc.wait()
    end = time.monotonic()
    if current is not None:
        outcome.stage_seconds[current] = end - since
    outcome.seconds = end - start
    if outcome.returncode != 0 and outcome.failed_stage is None:
        outcome.failed_stage = current
    return outcome


# The data a run reads, in pipeline order: the source a user brings, ingest's table, the splits.
DATA_PATHS = ("data/external", "data/raw", "data/prepared")
CURVES_PNG = Path("reports/retrain_curves.png")
REASON_DETAIL = re.compile(r"(: .*| of row \d+)$")  # the row-specific end of a reason
FAILED_SUMMARY = Path(".runway/validation-failed/summary.json")


def data_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """Each of DATA_PATHS's md5 as dvc.lock records it (as a dep or an out of any stage)."""
    import yaml

    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return {}
    found = {}
    for stage in stages.values():
        for entry in stage.get("deps", []) + stage.get("outs", []):
            if entry.get("path") in DATA_PATHS and entry.get("md5"):
                found[entry["path"]] = entry["md5"]
    return found


PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextmanager
def quiet_store():
    """Keep MLflow's INFO lines about opening a sqlite store and its artifact download bar
    out of the command's output while the report reads the store; restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    bar = os.environ.get(PROGRESS_BAR)
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar


def champion_before(model_name: str) -> dict:
    """The registered champion before this run and the profile of the data it was trained on
    (``data/profile.json`` in its run); ``{"missing": why}`` when there is none to compare."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException

        from pipeline import tracking
        from pipeline.data.profile import PROFILE_ARTIFACT

        uri = tracking.tracking_uri(create=False)
        with quiet_store():
            client = mlflow.MlflowClient(uri)
        try:
            with quiet_store():
                version = client.get_model_version_by_alias(model_name, "champion")
        except MlflowException:
            return {"missing": f"no champion of {model_name!r} in the MLflow store yet"}
        found = {"version": version.version, "run_id": version.run_id}
        try:
            with quiet_store(), tempfile.TemporaryDirectory() as folder:
                path = mlflow.artifacts.download_artifacts(
                    run_id=version.run_id,
                    artifact_path=PROFILE_ARTIFACT,
                    dst_path=folder,
                    tracking_uri=uri,
                )
                found["profile"] = json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - any failure to read it means: not comparable
            found["missing"] = (
                f"champion v{version.version}'s run has no {PROFILE_ARTIFACT} "
                "(trained before Runway logged one)"
            )
        return found
    except Exception as exc:  # noqa: BLE001 - the report says why, the run goes on
        return {"missing": f"cannot read the champion: {first_line(str(exc))}"}


def new_data_profile() -> dict | None:
    """The profile of the rows ingest wrote that fall in the train split (the same
    hash-of-id rule validate applies), so unchanged data shows no drift; None without data."""
    import pandas as pd

    from pipeline.config import load_params
    from pipeline.data.profile import profile
    from pipeline.data.table import ID_COLUMN, RAW_DIR, Manifest
    from pipeline.validation.split import assign_splits

    try:
        table = pd.read_parquet(RAW_DIR / "samples.parquet")
        manifest = Manifest.from_dict(_json(RAW_DIR / "manifest.json"))
    except Exception:  # noqa: BLE001 - no readable table: no drift section
        return None
    split = load_params("validate").split
    train = table[assign_splits(table[ID_COLUMN].astype(str), split) == "train"]
    return {"profile": profile(train, manifest), "manifest": manifest}


def drift_lines(champion: dict) -> list[str]:
    from pipeline.config import load_params
    from pipeline.data import profile as profiles

    if "profile" not in champion:
        return [f"- not compared: {champion.get('missing', 'no champion')}"]
    new = new_data_profile()
    if new is None:
        return ["- not compared: no readable data/raw (ingest did not finish)"]
    params = load_params("retrain")
    limits = profiles.Thresholds(params.drift_class_share, params.drift_mean, params.drift_std)
    result = profiles.compare(champion["profile"], new["profile"], limits)
    head = (
        f"New data (the train split of data/raw, {new['profile']['rows']} rows) against the "
        f"data champion v{champion['version']} was trained on "
        f"({champion['profile']['rows']} rows):"
    )
    return [head, "", *profiles.markdown(result, limits, new["manifest"].feature_name)]


def training_curves(run_id: str, path: Path = CURVES_PNG) -> Path | None:
    """Loss and accuracy per epoch of the training run, from MLflow's metric history."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import mlflow

        from pipeline import tracking

        with quiet_store():
            client = mlflow.MlflowClient(tracking.tracking_uri(create=False))
            history = {
                key: client.get_metric_history(run_id, key)
                for key in ("train/loss", "val/loss", "train/acc", "val/acc")
            }
    except Exception:  # noqa: BLE001 - no curves is not a failed retrain
        return None
    if not any(history.values()):
        return None
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, points in history.items():
        axis = loss if key.endswith("loss") else acc
        axis.plot([p.step for p in points], [p.value for p in points], marker=".", label=key)
    for axis, title in ((loss, "loss"), (acc, "accuracy")):
        axis.set(xlabel="epoch", title=title)
        axis.legend()
        axis.grid(alpha=0.3)
    fig.suptitle(f"training run {run_id[:12]}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def data_lines(outcome: Outcome) -> list[str]:
    """Data hashes before and after, rows, quarantined rows by reason, the GX result."""
    after = data_hashes()
    lines = ["| data | before | after |", "|---|---|---|"]
    for path in DATA_PATHS:
        old, new = outcome.hashes_before.get(path, "–"), after.get(path, "–")
        mark = " (changed)" if old != new else ""
        lines.append(f"| `{path}` | `{old[:12]}` | `{new[:12]}`{mark} |")
    lines.append("")
    failed = outcome.failed_stage == "validate" and FAILED_SUMMARY.is_file()
    summary = _json(FAILED_SUMMARY if failed else Path("reports/validation/summary.json"))
    if not summary:
        return lines
    where = FAILED_SUMMARY.parent if failed else Path("reports/validation")
    lines.append(
        f"- rows in: {summary.get('rows_in')}, quarantined: {summary.get('rows_quarantined', 0)}"
        + (f", kept: {summary['rows_out']}" if "rows_out" in summary else "")
    )
    reasons: dict[str, int] = {}
    for reason, n in summary.get("quarantine_reasons", {}).items():
        kind = REASON_DETAIL.sub("", str(reason))  # "exact duplicate of row 7" → its kind
        reasons[kind] = reasons.get(kind, 0) + int(n)
    if reasons:
        lines.append(
            "- quarantined by reason: " + "; ".join(f"{n} × {r}" for r, n in reasons.items())
        )
    stats = summary.get("statistics", {})
    suites = ", ".join(
        f"{suite} {s.get('successful_expectations')}/{s.get('evaluated_expectations')}"
        for suite, s in stats.items()
    )
    verdict = "passed" if summary.get("success") else "FAILED"
    lines.append(f"- Great Expectations: {verdict} ({suites} expectations met)")
    lines += [f"  - failed: {failure}" for failure in summary.get("failures", [])]
    lines.append(f"- reports: `{where}/summary.html`, Data Docs `{where}/data_docs/index.html`")
    return lines + [""]


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _diff_md(kind: str, base: str | None) -> str:
    """``dvc params diff --md`` (the changed keys) or ``dvc metrics diff --md --all`` (every
    metric, changed or not) against ``base`` (default: HEAD)."""
    args = (
        [kind, "diff", "--md"] + (["--all"] if kind == "metrics" else []) + ([base] if base else [])
    )
    done = dvc(*args, timeout=300)
    text = done.stdout.strip() if done.returncode == 0 else ""
    return text or f"_no {kind} changed_"


def tuning_lines(trials_csv: Path = Path("reports/tune/trials.csv")) -> list[str]:
    """Trials by state, the best value and the study's wall time, from Optuna's trials table."""
    import pandas as pd

    try:
        trials = pd.read_csv(trials_csv)
    except (OSError, ValueError):  # missing, or empty (tune.n_trials: 0)
        return ["- no tuning (tune.n_trials: 0, or no study yet)"]
    if trials.empty or "state" not in trials:
        return ["- no tuning (tune.n_trials: 0, or no study yet)"]
    counts = trials["state"].value_counts()
    states = ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
    lines = [f"- {len(trials)} trials: {states}"]
    done = trials[trials["state"] == "COMPLETE"]
    best_params = _json(Path("reports/tune/best_params.json"))
    if not done.empty:
        from pipeline.config import direction, load_params

        metric = load_params("tune").metric
        values = done["value"]
        best = done.loc[values.idxmin() if direction(metric) == "minimize" else values.idxmax()]
        shown = ", ".join(
            f"`{k}` {v:.3g}" if isinstance(v, float) else f"`{k}` {v}"
            for k, v in best_params.items()
        )
        lines.append(f"- best {metric} {best['value']:.4g} (trial {best['number']}): {shown}")
    seconds = pd.to_timedelta(trials["duration"], errors="coerce").dt.total_seconds().sum()
    lines.append(f"- trials' wall time {seconds:.0f} s")
    return lines


def report_markdown(outcome: Outcome, base: str | None = None) -> str:
    """The PR comment: what triggered the run, data, tuning, metrics, the decision, times."""
    ok = outcome.returncode == 0
    record = _json(Path("reports/register.json")) if ok else {}
    lines = [MARKER, "## Runway retrain", ""]
    if ok:
        if record:
            verdict = "promoted to champion" if record.get("promoted") else "champion unchanged"
            lines.append(
                f"**{record.get('model_name')} version {record.get('version')}: {verdict}** "
                f"— {record.get('reason')}"
            )
        else:
            lines.append("**The pipeline ran; nothing was registered.**")
    else:
        lines.append(
            f"**Failed in stage `{outcome.failed_stage}`**: {outcome.error or 'see the log'}"
        )
    lines += ["", "### What changed", ""]
    lines += [f"- {change}" for change in outcome.changes] or ["- (forced run)"]
    lines += ["", "### Params", "", _diff_md("params", base), ""]
    lines += ["### Data", "", *data_lines(outcome)]
    lines += ["### Drift", "", *drift_lines(outcome.champion), ""]
    lines += ["### Tuning", "", *tuning_lines(), ""]
    lines += ["### Metrics", "", _diff_md("metrics", base), ""]
    lines += champion_lines(record)
    run = _json(Path("models/run.json"))
    if run:
        lines += ["### Links", "", *link_lines(run, record), ""]
    lines += [
        "### Plots",
        "",
        f"The confusion matrix, per-class scores and training curves are in `{REPORT_HTML}` "
        "(the workflow's `retrain-reports` artifact).",
        "",
    ]
    if outcome.stage_seconds:
        lines += ["### Wall time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {s} | {t:.1f} |" for s, t in outcome.stage_seconds.items()]
        lines += [f"| total | {outcome.seconds:.1f} |", ""]
    return "\n".join(lines) + "\n"


def champion_lines(record: dict) -> list[str]:
    """This model against the champion on today's test split, from register.json."""
    comparison = record.get("comparison", {})
    if "champion" not in comparison:
        return []
    metric = comparison.get("metric")
    champion = comparison.get("champion_version")
    theirs = f"champion v{champion}" if champion else "the champion"
    return [
        f"Against {theirs} on today's test split: {metric} "
        f"{comparison['challenger']:.4f} (version {record.get('version')}) vs "
        f"{comparison['champion']:.4f} ({theirs}), min_delta {comparison.get('min_delta', 0):g}: "
        + ("**promoted**" if record.get("promoted") else "**not promoted**"),
        "",
    ]


def link_lines(run: dict, record: dict) -> list[str]:
    """The MLflow run and model version, as UI links when the store is a tracking server."""
    from pipeline import tracking

    uri = tracking.tracking_uri(create=False)
    base = uri.rstrip("/") + "/#" if uri.startswith(("http://", "https://")) else "`runway ui` → "
    run_path = f"/experiments/{run.get('experiment_id')}/runs/{run.get('run_id')}"
    lines = [f"- MLflow run `{run.get('run_id')}`: {base}{run_path}"]
    if record.get("uri"):
        model_path = f"/models/{record.get('model_name')}/versions/{record.get('version')}"
        lines.append(f"- model `{record['uri']}`: {base}{model_path}")
    return lines


def report_html(markdown: str, images: list[Path]) -> str:
    """The report as one HTML file that needs nothing else: the Markdown rendered (tables
    included, raw HTML escaped) and the images inlined."""
    from markdown_it import MarkdownIt

    text = markdown.replace(MARKER + "\n", "")
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    pictures = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(str(p))}'
        "</figcaption></figure>"
        for p in images
        if p.is_file()
    )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Runway retrain</title>'
        f"<style>{style}</style></head><body>{body}{pictures}</body></html>\n"
    )


def write_reports(outcome: Outcome, base: str | None = None) -> str:
    markdown = report_markdown(outcome, base)
    REPORT_MD.parent.mkdir(parents=True, exist_ok=True)
    REPORT_MD.write_text(markdown)
    images = [Path("reports/evaluate/confusion_matrix.png"), Path("reports/evaluate/per_class.png")]
    run = _json(Path("models/run.json"))
    if outcome.returncode == 0 and run.get("run_id"):
        curves = training_curves(run["run_id"])
        images += [curves] if curves else []
    REPORT_HTML.write_text(report_html(markdown, images))
    return markdown
