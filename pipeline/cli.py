"""``runway``: small commands around the pipeline (the pipeline itself runs with ``dvc repro``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Runway: a tracked ingest → validate → tune → train → evaluate → register pipeline. "
    "Run the pipeline with `dvc repro`; these commands look at its results.",
    no_args_is_help=True,
    add_completion=False,
)


def _read(path: str) -> dict | None:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else None


@app.command()
def summary() -> None:
    """Print the last run's test metrics, registered model and how to open the UI."""
    metrics = _read("reports/evaluate/metrics.json")
    record = _read("reports/register.json")
    if metrics is None or record is None:
        typer.echo("No results yet: run `make repro` (or `dvc repro`) first.", err=True)
        raise typer.Exit(1)
    test = metrics["test"]
    verdict = "promoted to champion" if record["promoted"] else "champion unchanged"
    validation = _read("reports/validation/summary.json") or {}
    data_line = ""
    if "rows_in" in validation:
        quarantined = validation.get("rows_quarantined", 0)
        data_line = (
            f"  data            {validation['rows_in']} rows, {quarantined} quarantined"
            + (" (see reports/validation/quarantine.csv)" if quarantined else "")
            + "\n"
        )
    typer.echo(
        "\nRunway results\n" + data_line + f"  test accuracy   {test['accuracy']:.4f}\n"
        f"  test macro F1   {test['f1_macro']:.4f}\n"
        f"  model           {record['model_name']} version {record['version']} "
        f"(aliases: {', '.join(record['aliases']) or 'none'})\n"
        f"  decision        {verdict}: {record['reason']}\n"
        f"  MLflow run      {record['run_id']}\n"
        "  open the UI     make ui   (then http://127.0.0.1:5000)\n"
    )


@app.command()
def baseline(
    c_grid: str = typer.Option("0.1,1,10,100", help="Comma-separated C values to try."),
    gamma_grid: str = typer.Option(
        "scale,0.0003,0.001,0.003,0.01", help="Comma-separated gamma values to try."
    ),
) -> None:
    """Score an RBF SVC (C and gamma chosen on val) on the pipeline's test split."""
    from pipeline.baseline import svc_baseline

    result = svc_baseline(
        [float(c) for c in c_grid.split(",")],
        [g if g == "scale" else float(g) for g in gamma_grid.split(",")],
    )
    metrics = _read("reports/evaluate/metrics.json")
    typer.echo(
        f"RBF SVC (C={result['C']}, gamma={result['gamma']}, val accuracy "
        f"{result['val_accuracy']:.4f}): test accuracy {result['test_accuracy']:.4f} "
        f"on {result['test_rows']} samples"
    )
    if metrics:
        typer.echo(f"pipeline model: test accuracy {metrics['test']['accuracy']:.4f}")


@app.command()
def ui(
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to bind. The UI has no "
        "authentication: bind beyond 127.0.0.1 only on a trusted network.",
    ),
    port: int = typer.Option(5000, help="Port to listen on."),
) -> None:
    """Serve the MLflow UI over the local store (mlruns/)."""
    from pipeline.io import NO_TELEMETRY
    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
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
    raise typer.Exit(subprocess.call(command, env=env))


if __name__ == "__main__":
    app()
