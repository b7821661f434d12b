"""Evaluate: score the trained model on the test split.

Writes ``reports/evaluate/metrics.json`` (``{"test/accuracy": ..., "test/precision_macro":
..., "test/recall_macro": ..., "test/f1_macro": ...}``, a DVC metrics file: the same names in
``dvc metrics show``, MLflow, register.json and the registry's version tags),
``per_class.json`` (keyed by class name) with the same figures as ``per_class.csv`` and
``per_class.png`` (a table and a plot, not one MLflow metric per class, so the UI's compare
view shows the four headline metrics),
``confusion_matrix.png`` (a DVC image plot) and ``predictions.csv`` (actual and predicted
class by name), and logs the same numbers and files into the training run, so one MLflow run
holds train, val and test results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import device as devices
from pipeline import tracking
from pipeline.config import load_params
from pipeline.data.loader import load_prepared
from pipeline.data.table import ID_COLUMN, PREPARED_DIR
from pipeline.io import (
    StageError,
    atomic_dir,
    atomic_path,
    load_error,
    read_json,
    require,
    run_stage,
    write_json,
)
from pipeline.models import ARCHITECTURE_VERSIONS, MODELS, MODELS_DIR, build_net, class_names

REPORT_DIR = Path("reports/evaluate")
METRICS = REPORT_DIR / "metrics.json"


def load_model(models_dir: Path = MODELS_DIR) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from model.json and load model.pt (weights only, never pickles)."""
    spec_path, weights = models_dir / "model.json", models_dir / "model.pt"
    for path in (spec_path, weights, models_dir / "run.json"):
        require(path, "train")
    spec = read_json(spec_path)
    name = spec.get("architecture")
    if name not in MODELS:
        raise StageError(f"{spec_path}: unknown architecture {name!r}")
    version, current = spec.get("architecture_version", 1), ARCHITECTURE_VERSIONS[name]
    if version != current:
        raise StageError(
            f"{spec_path}: the model is a {name} of layout version {version}, and this Runway "
            f"builds version {current}; retrain it (dvc repro train)"
        )
    net = build_net(spec)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:
        raise StageError(f"{weights}: cannot load the model weights: {load_error(exc)}") from None
    return net.eval(), spec


@torch.no_grad()
def predict(
    net: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Class index per row, batched on ``device`` (inputs as stored, sent as float32)."""
    net = net.to(device)
    out = [
        net(x[i : i + batch_size].to(device, torch.float32)).argmax(dim=1)
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).cpu().numpy()


def named(headline: dict[str, float]) -> dict[str, float]:
    """The headline metrics under the names they have everywhere (``test/accuracy``, ...)."""
    return {f"test/{k}": v for k, v in headline.items()}


def score(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[int], names: list[str] | None = None
) -> tuple[dict, dict]:
    """Headline metrics, and precision/recall/F1/support per class (keyed by class name)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average="macro", zero_division=0
    )
    headline = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
    }
    pc, rc, fc, sc = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average=None, zero_division=0
    )
    names = names or [str(c) for c in classes]
    per_class = {
        names[i]: {
            "precision": float(pc[i]),
            "recall": float(rc[i]),
            "f1": float(fc[i]),
            "support": int(sc[i]),
            "index": int(c),
        }
        for i, c in enumerate(classes)
    }
    return headline, per_class


def per_class_table(per_class: dict) -> pd.DataFrame:
    """One row per class: name, precision, recall, F1 and support (per_class.csv)."""
    rows = [
        {"class": name, **{k: v for k, v in m.items() if k != "index"}}
        for name, m in per_class.items()
    ]
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])


def plot_per_class(table: pd.DataFrame, path: Path) -> None:
    """Precision, recall and F1 of each class as grouped horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, ax = plt.subplots(figsize=(6.4, max(2.4, 0.45 * n + 1.2)), dpi=120)
    positions = np.arange(n)
    for offset, column in zip((-0.27, 0.0, 0.27), ("precision", "recall", "f1"), strict=True):
        ax.barh(positions + offset, table[column], height=0.26, label=column)
    ax.set_yticks(
        positions, [f"{c} ({s})" for c, s in zip(table["class"], table["support"], strict=True)]
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score on the test split")
    ax.set_title("Per-class precision, recall and F1 (test samples in brackets)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_confusion(y_true, y_pred, names: list[str], classes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, cmap="Blues", colorbar=False)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"Test confusion matrix ({len(y_true)} samples, accuracy {accuracy:.2%})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    params = load_params()
    data = load_prepared(splits=("test",), placement=params.train.data_placement)
    net, spec = load_model()
    names = class_names(data.manifest)
    if spec.get("class_names", names) != names:
        raise StageError(
            f"{MODELS_DIR}/model.json: the model was trained on classes {spec['class_names']} "
            f"but {PREPARED_DIR} has {names}: run the train stage again"
        )
    device = devices.available(params.train.accelerator)
    print(f"[evaluate] device {devices.describe(device)}")
    x, y = data.tensors["test"]
    y_pred = predict(net, x, params.evaluate.batch_size, device)
    classes = data.manifest.classes
    headline, per_class = score(y.numpy(), y_pred, classes, names)
    # Class names, not indices: an index means another class once a class is added.
    label = np.asarray(names, dtype=object)
    predictions = pd.DataFrame(
        {
            ID_COLUMN: data.tables["test"][ID_COLUMN],
            "actual": label[y.numpy()],
            "predicted": label[y_pred],
        }
    )
    with atomic_dir(REPORT_DIR) as tmp:
        if (REPORT_DIR / ".gitignore").exists():  # DVC's: names the cached outputs here
            (tmp / ".gitignore").write_bytes((REPORT_DIR / ".gitignore").read_bytes())
        write_json(tmp / METRICS.name, named(headline))
        write_json(tmp / "per_class.json", per_class)
        table = per_class_table(per_class)
        table.to_csv(tmp / "per_class.csv", index=False)  # a table in MLflow's artifact view
        plot_per_class(table, tmp / "per_class.png")
        predictions.to_csv(tmp / "predictions.csv", index=False)
        plot_confusion(
            y.numpy(),
            y_pred,
            names,
            classes,
            tmp / "confusion_matrix.png",
        )
    run = read_json(MODELS_DIR / "run.json")
    import mlflow

    tracking.setup(params.mlflow.experiment)
    with tracking.run(run["experiment_id"], "train", {}, run_id=run["run_id"]):
        mlflow.log_metrics(tracking.finite_metrics(named(headline)))
        mlflow.log_artifacts(str(REPORT_DIR), artifact_path="evaluation")
    print(
        f"[evaluate] test accuracy {headline['accuracy']:.4f}, macro F1 "
        f"{headline['f1_macro']:.4f} on {len(y)} samples; wrote {REPORT_DIR}/"
    )


if __name__ == "__main__":
    run_stage("evaluate", main)
