"""``runway``: small commands around the pipeline (the pipeline itself runs with ``dvc repro``).

Every command fails with one line, ``[command] error: ...`` on stderr, and a non-zero exit;
a bad option value gets click's usage error (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, NoReturn

import typer

app = typer.Typer(
    help="Runway: a tracked ingest → validate → tune → train → evaluate → register pipeline. "
    "Run the pipeline with `dvc repro`; these commands look at its results.",
    no_args_is_help=True,
    add_completion=False,
    # Plain click output: a usage error is one `Error: ...` line, not a box drawn to the
    # terminal's width; an unexpected exception is a plain traceback.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

METRICS = Path("reports/evaluate/metrics.json")
PREDICTIONS = Path("reports/evaluate/predictions.csv")
RECORD = Path("reports/register.json")
VALIDATION = Path("reports/validation/summary.json")
UI_LINE = "  open the UI     make ui   (then http://127.0.0.1:5000)"


def _fail(command: str, message: str) -> NoReturn:
    typer.echo(f"[{command}] error: {message}", err=True)
    raise typer.Exit(1)


def _read(command: str, path: Path) -> dict | None:
    """The JSON object in ``path``, None if there is no such file."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _fail(command, f"{path}: not readable JSON ({exc}): `dvc repro` writes it again")
    if not isinstance(data, dict):
        _fail(command, f"{path}: expected a JSON object: `dvc repro` writes it again")
    return data


# ---------------------------------------------------------------------------------- summary

# The pipeline's stages in order; a summary line is out of date when the stage that wrote it,
# or one before it, is.
STAGES = ("ingest", "validate", "tune", "train", "evaluate", "register")
STATUS_WORDS = {"modified": "changed", "deleted": "missing", "not in cache": "missing"}
PARAM_WORDS = {"modified": "changed", "new": "added", "deleted": "removed"}
SHOWN_REASONS = 4


def dvc_status() -> dict:
    """``dvc status --json``: the stages whose deps, params, outs or command changed since
    dvc.lock recorded them. Raises RuntimeError with DVC's message when it cannot tell."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(str(exc)) from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[0] if lines else f"exit status {done.returncode}")
    try:
        status = json.loads(done.stdout or "{}")
    except ValueError:
        raise RuntimeError(f"unreadable output {done.stdout[:100]!r}") from None
    return status if isinstance(status, dict) else {}


def _inside(path: str, folders: set[str]) -> bool:
    return any(path == f or path.startswith(f"{f}/") or f.startswith(f"{path}/") for f in folders)


def stale_stages(status: dict) -> tuple[list[str], list[str]]:
    """The pipeline stages ``dvc status`` reports, and what changed, in a few words each.

    The ``params`` stage (it only checks params.yaml) is left out: the stages report the
    keys they read. A changed dependency that is a changed output of another reported stage
    is a consequence, not a cause, and is not repeated."""
    from pipeline.stages.params import CHECKED

    stages = [s for s in status if s in STAGES]
    entries = [e for s in stages for e in status[s] if isinstance(e, dict)]
    outs = {path for e in entries for path in e.get("changed outs", {})}
    reasons: list[str] = []
    paths: set[str] = set()

    def add(reason: str, path: str | None = None) -> None:
        if path is not None:  # data/prepared and data/prepared/test.parquet: one reason
            if _inside(path, paths):
                return
            paths.add(path)
        if reason not in reasons:
            reasons.append(reason)

    for stage in stages:
        for entry in status[stage]:
            if isinstance(entry, str):
                if entry == "changed command":
                    add(f"the {stage} command changed")
                continue
            for path, state in entry.get("changed deps", {}).items():
                if isinstance(state, dict):  # a params file: key -> state
                    for key, key_state in state.items():
                        add(f"params {key} {PARAM_WORDS.get(key_state, key_state)}")
                elif path != CHECKED.as_posix() and not _inside(path, outs):
                    add(f"{path} {STATUS_WORDS.get(state, state)}", path)
            for path, state in entry.get("changed outs", {}).items():
                add(f"{path} {STATUS_WORDS.get(state, state)}", path)
    return stages, reasons


def store_view(record: dict) -> tuple[list[str] | None, str | None]:
    """What this MLflow store says of the record's run and model version: (the version's
    aliases, None) when it has both, else (None, a sentence saying what it lacks)."""
    from pipeline import tracking
    from pipeline.io import StageError

    uri = tracking.tracking_uri(create=False)
    path = tracking.store_file(uri)
    where = tracking.shown(path) if path else tracking.mask_value(uri)
    run_id, name, version = record["run_id"], record["model_name"], str(record["version"])
    model = f"{name} version {version}"
    if path is not None and not path.exists():
        return None, f"MLflow run {run_id} is not in this store ({where} does not exist)"
    try:
        tracking.check_store(uri)
    except StageError as exc:
        return None, f"Could not read the MLflow store: {exc}"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server: ask once
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        with tracking.store_errors(uri):
            try:
                client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return None, f"MLflow run {run_id} is not in this store ({where})"
            try:
                found = client.get_model_version(name, version)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return None, f"{model} is not in this store ({where})"
    except StageError as exc:
        return None, f"Could not read the MLflow store: {exc}"
    except MlflowException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"Could not read the MLflow store {where}: {first}"
    if found.run_id != run_id:
        return None, f"{model} in this store ({where}) is the model of run {found.run_id}"
    return sorted(found.aliases), None


def _row(label: str, value: str) -> str:
    return f"  {label:<16}{value}"


def summary_lines(metrics: dict, record: dict, validation: dict) -> list[str]:
    """The summary: lines that this store and these outputs agree on, then, under a sentence
    saying why, the lines that are out of date or not in this store."""
    aliases, store_note = store_view(record)
    verdict = "promoted to champion" if record["promoted"] else "champion unchanged"
    rows: list[tuple[str, str, str]] = []
    if "rows_in" in validation:
        quarantined = validation.get("rows_quarantined", 0)
        data = f"{validation['rows_in']} rows, {quarantined} quarantined" + (
            " (see reports/validation/quarantine.csv)" if quarantined else ""
        )
        rows.append(("validate", "data", data))
    aliases = record["aliases"] if aliases is None else aliases
    rows += [
        ("evaluate", "test/accuracy", f"{metrics['test/accuracy']:.4f}"),
        ("evaluate", "test/f1_macro", f"{metrics['test/f1_macro']:.4f}"),
        (
            "register",
            "model",
            f"{record['model_name']} version {record['version']} "
            f"(aliases: {', '.join(aliases) or 'none'})",
        ),
        ("register", "decision", f"{verdict}: {record['reason']}"),
        ("register", "MLflow run", str(record["run_id"])),
    ]

    notes: list[str] = []
    try:
        stages, reasons = stale_stages(dvc_status())
    except RuntimeError as exc:
        stages, reasons = [], []
        notes.append(f"Could not tell whether these are current: `dvc status` failed: {exc}")
    first = min((STAGES.index(s) for s in stages), default=len(STAGES))

    def set_aside(stage: str) -> bool:
        return STAGES.index(stage) >= first or (
            store_note is not None and stage in ("evaluate", "register")
        )

    current = [_row(label, value) for stage, label, value in rows if not set_aside(stage)]
    rest = [_row(label, value) for stage, label, value in rows if set_aside(stage)]
    why: list[str] = []
    if stages:
        shown = ", ".join(reasons[:SHOWN_REASONS])
        if len(reasons) > SHOWN_REASONS:
            shown += f" and {len(reasons) - SHOWN_REASONS} more"
        them = "them" if len(stages) > 1 else "it"
        why.append(
            f"Out of date: {', '.join(stages)} ({shown}): `dvc repro` brings {them} in line."
        )
    if store_note is not None:
        why.append(
            f"{store_note}: the test results and model below are what {METRICS} and {RECORD} "
            "say, logged elsewhere."
        )
    lines = ["", "Runway results", *current, *notes]
    if rest:
        lines += ["", *why, *rest, ""] if current else [*why, *rest, ""]
    return [*lines, UI_LINE, ""]


@app.command()
def summary() -> None:
    """Print the last run's test metrics and registered model, and say which of them are out
    of date (`dvc status`) or not in this MLflow store."""
    metrics = _read("summary", METRICS)
    record = _read("summary", RECORD)
    if metrics is None or record is None:
        typer.echo("No results yet: run `make repro` (or `dvc repro`) first.", err=True)
        raise typer.Exit(1)
    validation = _read("summary", VALIDATION) or {}
    try:
        lines = summary_lines(metrics, record, validation)
    except (KeyError, TypeError, ValueError) as exc:
        _fail(
            "summary",
            f"{METRICS} or {RECORD} is not what the evaluate and register stages write "
            f"({type(exc).__name__}: {exc}): `dvc repro` writes them again",
        )
    typer.echo("\n".join(lines))


# --------------------------------------------------------------------------------- baseline


def _grid(option: str, text: str, words: tuple[str, ...] = ()) -> list:
    """A comma-separated list of numbers > 0 (or one of ``words``)."""
    values: list = []
    for item in (part.strip() for part in text.split(",")):
        if item in words:
            values.append(item)
            continue
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            allowed = " or ".join(["a number > 0", *(repr(w) for w in words)])
            raise typer.BadParameter(f"{item!r} is not {allowed}", param_hint=option)
        values.append(value)
    return values


@app.command()
def baseline(
    c_grid: str = typer.Option("0.1,1,10,100", help="Comma-separated C values to try."),
    gamma_grid: str = typer.Option(
        "scale,0.0003,0.001,0.003,0.01", help="Comma-separated gamma values to try."
    ),
    train_samples: int | None = typer.Option(
        None,
        min=1,
        help="Fit on at most this many training samples (drawn at random, the same each "
        "time). An SVC's fit time grows at least with the square of the samples: on "
        "MNIST-sized data 5000 take about 30 s per (C, gamma), ten times as many at least "
        "a hundred times as long.",
    ),
) -> None:
    """Score an RBF SVC (C and gamma chosen on val) on the pipeline's test split."""
    from pipeline.baseline import same_test_set, svc_baseline
    from pipeline.io import StageError

    c_values = _grid("--c-grid", c_grid)
    gamma_values = _grid("--gamma-grid", gamma_grid, ("scale", "auto"))
    try:
        result = svc_baseline(c_values, gamma_values, train_samples=train_samples)
        metrics = _read("baseline", METRICS)
        comparable = metrics is not None and same_test_set(PREDICTIONS)
    except StageError as exc:
        _fail("baseline", str(exc))
    typer.echo(
        f"RBF SVC (C={result['C']}, gamma={result['gamma']}, val accuracy "
        f"{result['val_accuracy']:.4f}, fitted on {result['train_rows']} training samples): "
        f"test accuracy {result['test_accuracy']:.4f} "
        f"on {result['test_rows']} samples"
    )
    score = (metrics or {}).get("test/accuracy")
    if not isinstance(score, int | float):
        return
    accuracy = f"test accuracy {score:.4f}"
    if comparable:
        typer.echo(f"pipeline model: {accuracy}")
    else:
        typer.echo(
            f"pipeline model: {accuracy} on another test set ({PREDICTIONS} does not list "
            "the samples of data/prepared/test.parquet): `dvc repro` evaluates it on this one"
        )


# ------------------------------------------------------------------------------------- ui

# The MLflow UI opens an experiment in its GenAI view unless the URL asks for the classic
# runs table (the `workflowType` search parameter of the UI's experiment page).
CLASSIC_VIEW = "?workflowType=machine_learning"
STOP_GRACE_S = 10.0


def project_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds dvc.yaml and params.yaml."""
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return None


def _ui_params(root: Path) -> tuple[str | None, str | None]:
    """(``mlflow.experiment``, ``register.model_name``) from the project's params.yaml."""
    import yaml

    path = root / "params.yaml"
    try:
        params = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _fail("ui", f"{path}: not readable YAML ({first})")
    params = params if isinstance(params, dict) else {}

    def value(section: str, key: str) -> str | None:
        found = params.get(section)
        found = found.get(key) if isinstance(found, dict) else None
        return found if isinstance(found, str) and found else None

    return value("mlflow", "experiment"), value("register", "model_name")


def bind_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port``, found by binding it as uvicorn
    does (SO_REUSEADDR, IPv6 for an address with a colon); None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            return f"--host {host}: unknown host ({exc.strerror})"
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use (another `runway ui` or MLflow "
                    "server?): stop it or choose another --port"
                )
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"--host {host}: not an address of this machine"
            if exc.errno == errno.EACCES:
                return f"port {port} on {host}: permission denied: choose a port above 1023"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _netloc(host: str, port: int) -> str:
    """``host:port`` to reach a server bound to ``host`` from this machine."""
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{local}]:{port}" if ":" in local else f"{local}:{port}"


def _answers(host: str, port: int) -> bool:
    """Whether an HTTP server answers on host:port (any status: it is up)."""
    try:
        with urllib.request.urlopen(f"http://{_netloc(host, port)}/health", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def ui_links(uri: str, base: str, experiment: str | None, model: str | None) -> list[str]:
    """Lines linking to the experiment's runs table, its newest training run (tag
    ``stage=train``) and the ``champion`` version of ``model``: those this store has."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server: ask once
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    def absent(exc: MlflowException) -> bool:
        return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    lines: list[str] = []
    with tracking.store_errors(uri):
        found = client.get_experiment_by_name(experiment) if experiment else None
        if found is not None:
            runs = f"{base}/#/experiments/{found.experiment_id}"
            lines.append(_row("runs", f"{runs}{CLASSIC_VIEW}  ({experiment})"))
            latest = client.search_runs(
                [found.experiment_id],
                filter_string="tags.stage = 'train'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if latest:
                lines.append(
                    _row("latest training", f"{runs}/runs/{latest[0].info.run_id}{CLASSIC_VIEW}")
                )
        if model:
            try:
                champion = client.get_model_version_by_alias(model, "champion")
            except MlflowException as exc:
                if not absent(exc):
                    raise
            else:
                name = urllib.parse.quote(model, safe="")
                lines.append(
                    _row(
                        "champion model",
                        f"{base}/#/models/{name}/versions/{champion.version}{CLASSIC_VIEW}"
                        f"  ({model} version {champion.version})",
                    )
                )
    return lines


class _Stopped(BaseException):  # not caught by `except Exception`
    """SIGINT, SIGTERM or SIGHUP came: stop the server and exit 0."""


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


@app.command()
def ui(
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to bind. The UI has no "
        "authentication: bind beyond 127.0.0.1 only on a trusted network.",
    ),
    port: int = typer.Option(5000, min=1, max=65535, help="Port to listen on."),
) -> None:
    """Serve the MLflow UI over the project's store (mlruns/ next to dvc.yaml, from any
    folder of the project) and print links to its runs and champion model. Ctrl+C or
    SIGTERM stops the server."""
    from pipeline.io import NO_TELEMETRY, STOP_SIGNALS, StageError
    from pipeline.tracking import check_store, shown

    root = project_root(Path.cwd().resolve())
    if root is None:
        _fail(
            "ui",
            f"{Path.cwd()} is not inside a Runway project (no folder at or above it holds "
            "dvc.yaml and params.yaml): run `runway ui` in the project",
        )
    experiment, model = _ui_params(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        db = root / "mlruns" / "mlflow.db"
        if not db.is_file():
            _fail("ui", f"no MLflow store at {shown(db)} yet: `dvc repro` makes it")
    try:
        check_store(uri)
    except StageError as exc:
        _fail("ui", str(exc))
    problem = bind_problem(host, port)
    if problem:
        _fail("ui", problem)
    typer.echo(f"MLflow UI for {uri} on http://{host}:{port} (Ctrl+C to stop)")
    env = {**NO_TELEMETRY, **os.environ}
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    # The server runs in its own process group, so that a stop reaches all its processes
    # (uvicorn's too) and only through this command, which waits for them. A stop signal
    # that comes while the server is starting is acted on once it has started.
    stop: list[int] = []
    running: list[subprocess.Popen] = []

    def on_stop(signum: int, frame: object) -> None:
        if not stop:
            stop.append(signum)
            if running:
                raise _Stopped

    previous = {signum: signal.signal(signum, on_stop) for signum in STOP_SIGNALS}
    code = 0
    try:
        running.append(subprocess.Popen(command, env=env, cwd=root, process_group=0))
        if not stop:
            code = _serve(running[0], host, port, uri, experiment, model)
    except _Stopped:
        code = 0
    finally:
        if running:
            _stop_server(running[0])
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    raise typer.Exit(code)


def _serve(
    server: subprocess.Popen,
    host: str,
    port: int,
    uri: str,
    experiment: str | None,
    model: str | None,
) -> int:
    """Watch the server until it exits (a stop signal raises :class:`_Stopped`); its exit
    code."""
    from pipeline.io import StageError

    served = False
    while True:
        code = server.poll()
        if code is not None:
            # `mlflow ui` may exit 0 when its server could not start (or 1, as it may here).
            if not served:
                _fail(
                    "ui",
                    f"the MLflow server stopped before it answered on http://{host}:{port} "
                    "(its messages are above)",
                )
            return code
        if not served and _answers(host, port):
            served = True
            try:
                links = ui_links(uri, f"http://{_netloc(host, port)}", experiment, model)
            except StageError as exc:
                links = [f"  (no links: {exc})"]
            except Exception as exc:  # an unreadable store must not take the UI down
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                links = [f"  (no links: could not read the MLflow store: {first})"]
            if not links:
                links = [f"  (no runs of {experiment or 'this project'} in this store yet)"]
            typer.echo("\n".join(["", "Open in the MLflow UI:", *links, ""]))
        time.sleep(0.2 if not served else 0.5)


def _stop_server(server: subprocess.Popen) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL after STOP_GRACE_S) and wait
    until none of its processes is left."""
    from pipeline.server import group_alive

    group = server.pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        server.poll()
        if not group_alive(group):
            break
        time.sleep(0.1)
    else:
        _signal_group(group, signal.SIGKILL)
    server.wait()
    while group_alive(group) and time.monotonic() < deadline + STOP_GRACE_S:
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ store

store_app = typer.Typer(help="The project's local MLflow store (mlruns/).", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("relocate")
def store_relocate(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would change; change nothing."),
) -> None:
    """Point a moved or copied project's store (mlruns/mlflow.db) at this project's
    mlruns/artifacts; the pipeline's stages do this by themselves when they start."""
    from pipeline import tracking
    from pipeline.io import StageError

    if os.environ.get("MLFLOW_TRACKING_URI"):
        _fail("store", "MLFLOW_TRACKING_URI is set: the store is not this project's mlruns/")
    root = project_root(Path.cwd().resolve())
    if root is None:
        _fail(
            "store", "no Runway project here (no dvc.yaml and params.yaml in this folder or above)"
        )
    mlruns = root / tracking.store_dir(root)  # the original's, in DVC's experiment copy
    try:
        line = tracking.relocate_store(mlruns, dry_run)
    except StageError as exc:
        _fail("store", str(exc))
    where = tracking.shown(mlruns / "mlflow.db")
    typer.echo(line or f"{where} already points at this project's artifacts: nothing to do")


# ---------------------------------------------------------------------------------- retrain


@app.command()
def retrain(
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            metavar="KEY=VALUE",
            help="Override a params.yaml value for this run (dvc exp run -S); repeatable.",
        ),
    ] = None,
    force: bool = typer.Option(False, "--force", help="Run every stage even if nothing changed."),
    base: str = typer.Option(
        "", "--base", metavar="REV", help="Git revision to diff params and metrics against."
    ),
) -> None:
    """Pull (from the default DVC remote, if one is set), say what changed since the last
    recorded run, reproduce it, write reports/retrain.md and .html, and push the new outputs.
    Exits 0 with "nothing to retrain" when nothing changed; non-zero when a stage failed."""
    from pipeline import retrain as flow
    from pipeline.config import load_params

    set_ = set_ or []
    try:
        remote = flow.default_remote()
        if remote is not None:
            typer.echo(f"[retrain] dvc pull from remote {remote[0]!r} ({remote[1]})")
            flow.pull(remote)
        flow.check_params()
        stages, changes = stale_stages(dvc_status())
    except (flow.RetrainError, RuntimeError) as exc:
        _fail("retrain", str(exc))
    if not stages and not set_ and not force:
        typer.echo("[retrain] nothing to retrain: dvc.lock matches the data, params and code")
        return
    for change in changes:
        typer.echo(f"[retrain] changed: {change}")
    if set_:
        command = [sys.executable, "-m", "dvc", "exp", "run"]
        command += [arg for pair in set_ for arg in ("-S", pair)]
    else:
        command = [sys.executable, "-m", "dvc", "repro"] + (["-f"] if force else [])
    model_name = load_params("register").model_name
    outcome = flow.reproduce(command, changes + [f"--set {pair}" for pair in set_], model_name)
    flow.write_reports(outcome, base or None)
    typer.echo(f"[retrain] report: {flow.REPORT_MD} and {flow.REPORT_HTML}")
    if outcome.returncode != 0:
        _fail("retrain", f"stage {outcome.failed_stage} failed: {outcome.error or 'see above'}")
    if remote is not None:
        try:
            typer.echo(f"[retrain] dvc push to remote {remote[0]!r}: {flow.push(remote)}")
        except flow.RetrainError as exc:
            _fail("retrain", str(exc))


# ------------------------------------------------------------------------------ tune-worker


@app.command("tune-worker")
def tune_worker(
    threads: int = typer.Option(
        0, "--threads", min=0, help="torch threads for this worker (0: torch's default)."
    ),
) -> None:
    """Join the current tuning study from this machine and run trials until the study has
    tune.n_trials finished trials in total, counting every worker's. Needs the same
    params.yaml and prepared data as the tune stage (git pull, dvc pull), tune.storage naming
    an environment variable set to the shared study database's URL, and MLFLOW_TRACKING_URI
    (and credentials) of the team's server; the tune stage (dvc repro) starts the study."""
    command = [sys.executable, "-m", "pipeline.stages.tune", "--join"]
    if threads:
        command += ["--threads", str(threads)]
    try:
        code = subprocess.call(command)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------- remote

remote_app = typer.Typer(
    help="The DVC remote that `runway retrain` pulls from and pushes to.", no_args_is_help=True
)
app.add_typer(remote_app, name="remote")


@remote_app.command("add")
def remote_add(
    url: str = typer.Argument(
        ..., help="A local directory (made if missing), or any URL DVC knows (s3://bucket/path)."
    ),
    name: str = typer.Option("local", "--name", help="The remote's name in .dvc/config."),
) -> None:
    """Make URL the default DVC remote (`dvc remote add -d`), written to .dvc/config, which is
    committed. Credentials never go there: `dvc remote modify --local NAME ...` keeps them in
    .dvc/config.local (git-ignored), or set them in the environment."""
    if "://" not in url:
        folder = Path(url).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail("remote", f"cannot make the remote folder {folder}: {exc.strerror}")
        url = str(folder)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "--default", "--force", name, url],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        _fail("remote", lines[0].removeprefix("ERROR: ") if lines else "dvc remote add failed")
    typer.echo(f"[remote] {name!r} ({url}) is the default DVC remote (.dvc/config)")


# ----------------------------------------------------------------------------------- server

server_app = typer.Typer(
    help="The team's tracking server: PostgreSQL and an MLflow server with basic auth.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


def _connect_lines(state, client_env: str) -> list[str]:
    return [
        f"  set -a; . {client_env}; set +a",
        f"  (sets MLFLOW_TRACKING_URI={state.uri}, MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, and OPTUNA_STORAGE for tune.storage: OPTUNA_STORAGE)",
    ]


@server_app.command("start")
def server_start(
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to serve on; 0.0.0.0 serves other machines too."
    ),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="The MLflow server's port."),
    workers: int = typer.Option(2, "--workers", min=1, help="uvicorn workers of the server."),
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Another name clients reach the server by (a DNS alias); repeatable. Other "
            "Host headers get 403.",
        ),
    ] = None,
) -> None:
    """Start PostgreSQL (127.0.0.1 only) and the MLflow tracking server on it, with basic
    auth and artifacts served through it; state and secrets live in .runway/server/
    (RUNWAY_SERVER_DIR). Generated credentials are printed once, when first made. The
    server always asks for a password, so --host 0.0.0.0 is safe to use on a trusted
    network; it answers requests for this machine's name and address (and --allowed-host)."""
    from pipeline import server
    from pipeline.io import StageError, stop_signals_handled

    came: list[int] = []

    def stopped(signum: int, frame: object) -> None:  # SIGTERM and SIGHUP too, as ^C
        came.append(signum)
        raise KeyboardInterrupt

    try:
        with stop_signals_handled(stopped):
            state, new = server.start(host, port, workers, tuple(allowed_host or ()))
    except StageError as exc:
        _fail("server", str(exc))
    except KeyboardInterrupt:  # an MLflow server not answering yet is stopped (server.start)
        signum = signal.Signals(came[0] if came else signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}"
        typer.echo(f"[server] start {how}: runway server stop stops what it started", err=True)
        raise typer.Exit(128 + signum) from None
    folder = server.server_dir()
    creds = folder / "credentials.env"
    client = folder / "client.env"
    typer.echo(f"[server] MLflow at {state.uri} on PostgreSQL 127.0.0.1:{state.pg_port}")
    if new:
        secret = server.credentials(folder)
        typer.echo(
            f"[server] admin password (shown once; kept in {creds}, mode 600): "
            f"{secret['MLFLOW_TRACKING_PASSWORD']}"
        )
    typer.echo("[server] to log to it:\n" + "\n".join(_connect_lines(state, str(client))))


@server_app.command("migrate")
def server_migrate(
    source: str = typer.Option(
        "",
        "--from",
        metavar="URI",
        help="The store to copy (default: this project's mlruns/mlflow.db).",
    ),
) -> None:
    """Copy this project's local MLflow store onto the team's server: experiments, runs
    (params, tags, every metric's history, artifacts; trials stay nested under their tune
    run), logged models, and registered models with their versions and aliases. The server is
    MLFLOW_TRACKING_URI (with _USERNAME and _PASSWORD), else the running `runway server`.
    Running it again copies only what is new."""
    from pipeline import migrate, tracking
    from pipeline.io import StageError

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    local = source or tracking.tracking_uri(create=False)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    path = tracking.store_file(local)
    if path is not None and not path.is_file():
        _fail("migrate", f"no local store to copy: {tracking.shown(path)} does not exist")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server: ask once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line a run
    try:
        target = migrate.target_uri()
        typer.echo(f"[migrate] {tracking.mask_value(local)} -> {target}")
        counts = migrate.migrate(local, target, typer.echo)
    except StageError as exc:
        _fail("migrate", str(exc))
    typer.echo(f"[migrate] done: {counts.line()}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the MLflow server and PostgreSQL (the data stays in .runway/server/)."""
    from pipeline import server
    from pipeline.io import StageError

    try:
        stopped = server.stop()
    except StageError as exc:
        _fail("server", str(exc))
    typer.echo(f"[server] stopped {', '.join(stopped)}" if stopped else "[server] not running")


@server_app.command("status")
def server_status() -> None:
    """What runs, where, and how a client connects; exit 1 when the server is not up."""
    from pipeline import server

    found = server.status()
    if not found["started"]:
        typer.echo(f"[server] never started here ({found['folder']}): runway server start")
        raise typer.Exit(1)
    state = server.read_state(Path(found["folder"]))
    up = "up" if found["mlflow"] else "down"
    pg = "up" if found["postgres"] else "down"
    typer.echo(f"[server] MLflow {state.uri}: {up}; PostgreSQL 127.0.0.1:{found['pg_port']}: {pg}")
    if found["mlflow"]:
        lines = _connect_lines(state, found["client_env"])
        typer.echo("[server] to log to it:\n" + "\n".join(lines))
    else:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
