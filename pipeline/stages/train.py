"""Train: the final model, with params.yaml's ``train`` section merged with the tuned values.

Seeded and deterministic on the CPU; early stopping and the best checkpoint follow
``train.monitor``. Per-epoch metrics go to MLflow through Lightning's MLFlowLogger (tracking
URI passed explicitly), and the network is logged as an MLflow model with a signature and an
input example. Writes ``models/``: ``model.pt`` (state dict), ``model.json`` (what it takes to
rebuild it), ``checkpoints/best.ckpt`` and ``run.json`` (MLflow run id and model URI).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.config import ModelParams, Params, TrainParams, direction, load_params, with_tuned
from pipeline.io import StageError, atomic_dir, read_json, run_stage, write_json
from pipeline.models import MODELS_DIR, model_spec
from pipeline.training import EpochLine, Prepared, fit, load_prepared

BEST_PARAMS = Path("reports/tune/best_params.json")


def merged_params(
    params: Params, best_params_path: Path = BEST_PARAMS
) -> tuple[TrainParams, ModelParams]:
    """The train and model sections with the tuned values on top."""
    best = read_json(best_params_path) if best_params_path.exists() else {}
    return with_tuned(params.train, params.model, best, str(best_params_path))


def train(
    hp: TrainParams, model: ModelParams, data: Prepared, experiment: str, out_dir: Path
) -> dict:
    """Fit, keep the best checkpoint, save and log the model; return run.json's content."""
    import mlflow
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.models import infer_signature

    experiment_id = tracking.setup(experiment)
    tags = tracking.run_tags("train", data.manifest.source)
    with tracking.run(experiment_id, "train", tags) as active:
        run_id = active.info.run_id
        mlflow.log_params(hp.model_dump())
        mlflow.log_params({f"model.{k}": v for k, v in model.model_dump().items()})
        mlflow.log_params({f"data.{s}_rows": len(t) for s, t in data.tables.items()})
        mode = "max" if direction(hp.monitor) == "maximize" else "min"
        best = ModelCheckpoint(
            dirpath=out_dir / "checkpoints", filename="best", monitor=hp.monitor, mode=mode
        )
        callbacks = [
            EarlyStopping(monitor=hp.monitor, mode=mode, patience=hp.patience),
            best,
            EpochLine(),
        ]
        logger = MLFlowLogger(tracking_uri=tracking.tracking_uri(), run_id=run_id)
        module, trainer = fit(hp, model, data, callbacks, logger=logger, checkpoint=True)
        if not best.best_model_path:
            raise StageError("training produced no checkpoint")
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        net = module.net.cpu().eval()
        torch.save(net.state_dict(), out_dir / "model.pt")
        spec = model_spec(model.name, data.manifest, model.channels, model.dropout)
        (out_dir / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
        best_score = float(best.best_model_score)
        mlflow.log_metrics(
            tracking.finite_metrics(
                {f"best_{hp.monitor}": best_score, "epochs_trained": trainer.current_epoch}
            )
        )
        # Served inputs are float32 raw values, whatever the storage dtype.
        example = data.tensors["train"][0][:5].to(torch.float32).numpy()
        with torch.no_grad():
            output = net(torch.from_numpy(example)).numpy()
        info = mlflow.pytorch.log_model(
            net,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        mlflow.log_dict(spec, "model_spec.json")
        return {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "model_uri": info.model_uri,
            "runs_uri": f"runs:/{run_id}/model",
            f"best_{hp.monitor}": best_score,
            "epochs_trained": trainer.current_epoch,
        }


def main() -> None:
    params = load_params()
    hp, model = merged_params(params)
    data = load_prepared(splits=("train", "val"))
    pretrained = f", weights {model.weights_path}" if model.weights_path else ""
    frozen = ", backbone frozen" if model.freeze_backbone else ""
    augment = f", augment {'+'.join(hp.augment)}" if hp.augment else ""
    print(
        f"[train] {model.name} (channels {model.channels}, dropout {model.dropout:g}"
        f"{pretrained}{frozen}), {hp.optimizer} lr {hp.lr:.3g}, batch {hp.batch_size}"
        f"{augment}, up to {hp.max_epochs} epochs on {len(data.tables['train'])} samples"
    )
    start = time.perf_counter()
    with atomic_dir(MODELS_DIR) as tmp:
        run = train(hp, model, data, params.mlflow.experiment, tmp)
        write_json(tmp / "run.json", run)
    print(
        f"[train] best {hp.monitor} {run[f'best_{hp.monitor}']:.4f} after "
        f"{run['epochs_trained']} epochs ({time.perf_counter() - start:.0f}s); "
        f"MLflow run {run['run_id']}"
    )


if __name__ == "__main__":
    run_stage("train", main)
