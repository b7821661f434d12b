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
import re
import subprocess
import sys
import time
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


def reproduce(command: list[str], changes: list[str]) -> Outcome:
    """Run ``command`` (dvc repro / dvc exp run), echoing its output, timing each stage."""
    outcome = Outcome(changes, command)
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
    lines = [MARKER, "## Runway retrain", ""]
    if ok:
        record = _json(Path("reports/register.json"))
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
    validation = _json(Path("reports/validation/summary.json"))
    if validation:
        lines += [
            "### Data",
            "",
            f"- rows in: {validation.get('rows_in')}, quarantined: "
            f"{validation.get('rows_quarantined', 0)}",
            f"- validation: {'passed' if validation.get('success') else 'FAILED'} "
            "(report: `reports/validation/summary.html`)",
            "",
        ]
    lines += ["### Tuning", "", *tuning_lines(), ""]
    lines += ["### Metrics", "", _diff_md("metrics", base), ""]
    run = _json(Path("models/run.json"))
    record = _json(Path("reports/register.json")) if ok else {}
    if run:
        lines += [
            "### Links",
            "",
            f"- MLflow run `{run.get('run_id')}` (`runway ui`, then the latest training link)",
        ]
        if record.get("uri"):
            lines.append(f"- model `{record['uri']}`")
        lines.append("")
    if outcome.stage_seconds:
        lines += ["### Wall time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {s} | {t:.1f} |" for s, t in outcome.stage_seconds.items()]
        lines += [f"| total | {outcome.seconds:.1f} |", ""]
    return "\n".join(lines) + "\n"


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
    REPORT_HTML.write_text(report_html(markdown, images))
    return markdown
