"""The train stage in-process: checkpoints, interruption and resume, the kept (best) weights,
and what it records in MLflow (per-epoch metrics at step = epoch, device, determinism)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch

import pipeline.stages.train as stage
from pipeline.config import ModelParams, TrainParams
from pipeline.io import StageError, Terminated
from pipeline.stages.train import Resume, train

HP = TrainParams(max_epochs=4, patience=4, batch_size=64, accelerator="cpu")
MODEL = ModelParams(channels=8)
# A high learning rate kept high (cosine over 40 epochs): val/loss rises in epoch 2, and early
# stopping (patience 1) ends the run there.
EARLY_STOP = HP.model_copy(
    update={"max_epochs": 40, "patience": 1, "lr": 0.05, "optimizer": "adam"}
)


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process as batch ``batch`` of epoch ``epoch`` (1-based) starts."""

    def __init__(self, signum: int, epoch: int, batch: int) -> None:
        self.signum, self.epoch, self.batch = signum, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch + 1 == self.epoch and batch_idx + 1 == self.batch:
            os.kill(os.getpid(), self.signum)


def with_callbacks(monkeypatch, *extra: pl.Callback) -> None:
    """Make the stage train with ``extra`` callbacks besides its own."""
    original = stage.train_callbacks

    def callbacks(hp, resume):
        own, checkpoint = original(hp, resume)
        return [*own, *extra], checkpoint

    monkeypatch.setattr(stage, "train_callbacks", callbacks)


def run_train(digits_prepared, tmp_path, name: str, hp: TrainParams = HP) -> dict:
    """What the stage's main() does around train(): the resume state goes once it is done."""
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    resume = Resume("key")
    run = train(hp, MODEL, digits_prepared, "t", out, resume)
    resume.finished()
    return run


def test_the_train_stage_names_data_memory_mapped_from_disk_and_tags_its_run(
    digits_prepared, mlflow_store, capsys
):
    from mlflow.tracking import MlflowClient

    from pipeline.data.loader import load_prepared
    from pipeline.io import write_json

    folder = mlflow_store / "prepared"
    folder.mkdir()
    for split in ("train", "val"):
        digits_prepared.tables[split].to_parquet(folder / f"{split}.parquet", index=False)
    write_json(folder / "manifest.json", digits_prepared.manifest.to_dict())
    data = load_prepared(folder, ("train", "val"), "disk", mapped_dir=mlflow_store / "mapped")
    hp = HP.model_copy(update={"data_placement": "disk", "max_epochs": 1})
    run_train(data, mlflow_store, "disk", hp)
    assert (len(data.tables["train"]), len(data.tables["val"])) == (1252, 277)
    out = capsys.readouterr().out  # (1,252 + 277) × 64 float32 pixels: 0.37 MB
    assert (
        "[train] data streamed from disk (memory-mapped) (0.4 MB, train.data_placement: disk)\n"
        in out
    )
    client = MlflowClient()
    assert client.get_run(_last_run_id(client)).data.tags["data.placement"] == "disk"


def epoch_lines(text: str) -> list[int]:
    return [
        int(line.split()[2].split("/")[0])
        for line in text.splitlines()
        if line.startswith("[train] epoch")
    ]


@pytest.fixture
def python_sigint():
    """^C with Python's own handler, as in the stage's process. A test-suite worker process
    can come to this test with another one (seen under xdist: ^C then did nothing), left by
    an earlier in-process test; the one found is put back afterwards."""
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield found
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, found)


@pytest.mark.slow  # trains and interrupts a model twice
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_run_saves_a_checkpoint_and_resumes_exactly(
    digits_prepared, mlflow_store, monkeypatch, capsys, signum, python_sigint
):
    from mlflow.tracking import MlflowClient

    tmp = mlflow_store
    reference = run_train(digits_prepared, tmp, "reference")
    capsys.readouterr()
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))

    with monkeypatch.context() as patch:
        with_callbacks(patch, SignalAt(signum, epoch=2, batch=6))
        expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        with pytest.raises(expected):
            run_train(digits_prepared, tmp, "interrupted")
    out = capsys.readouterr().out
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert "[train] interrupted in epoch 2 after 26 optimizer steps" in out  # 20 + 6 steps
    assert "saved to .runway/train/last.ckpt; run the stage again to resume" in out
    assert epoch_lines(out) == [1]
    client = MlflowClient()
    killed = client.get_run(_last_run_id(client))
    assert killed.info.status == "KILLED"

    resumed = run_train(digits_prepared, tmp, "resumed")
    out = capsys.readouterr().out
    assert "[train] resuming the interrupted run from .runway/train/last.ckpt" in out
    assert epoch_lines(out) == [2, 3, 4]
    assert resumed["run_id"] == killed.info.run_id
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"
    assert not (tmp / ".runway/train").exists()
    # Same weights, same metrics, one point per epoch at steps 0..3, as if never stopped.
    assert (tmp / "resumed/model.pt").read_bytes() == (tmp / "reference/model.pt").read_bytes()
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        got = sorted(client.get_metric_history(resumed["run_id"], key), key=lambda m: m.step)
        want = sorted(client.get_metric_history(reference["run_id"], key), key=lambda m: m.step)
        assert [m.step for m in got] == [0, 1, 2, 3]
        assert [m.value for m in got] == [m.value for m in want]


class Crash(Exception):
    """Stands in for SIGKILL: not an interruption, so no checkpoint is saved on it; what is
    left to resume from is the checkpoint of the last epoch end."""


class CrashAt(pl.Callback):
    """Raises :class:`Crash` as batch 3 of ``epoch`` (1-based) starts, or with ``epoch`` None
    when training has ended (early stopping included), before the stage saves the model."""

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch + 1 == self.epoch and batch_idx == 2:
            raise Crash

    def on_train_end(self, trainer, pl_module):
        if self.epoch is None:
            raise Crash


def metric_histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in ("train/loss", "train/acc", "val/loss", "val/acc")
    }


EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "train/samples_per_s")
EVERY_EPOCH_ONCE = {key: [0, 1, 2] for key in EPOCH_METRICS}  # a 3-epoch run


def logged_steps(client, run_id: str) -> dict[str, list[int]]:
    """The steps of each per-epoch metric in MLflow, a repeated step as often as it is there."""
    return {
        key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in EPOCH_METRICS
    }


@pytest.mark.slow  # trains three times
@pytest.mark.parametrize(
    ("hp", "epoch", "resumed_epochs"),
    [
        (HP, 3, [3, 4]),  # killed in epoch 3 of 4: resumes from epoch 2's end
        (EARLY_STOP, None, []),  # killed after early stopping, before the model was saved
    ],
    ids=["mid-run", "after-early-stopping"],
)
def test_a_killed_run_resumes_from_the_last_epoch_end_exactly(
    digits_prepared, mlflow_store, monkeypatch, capsys, hp, epoch, resumed_epochs
):
    from mlflow.tracking import MlflowClient

    tmp = mlflow_store
    reference = run_train(digits_prepared, tmp, "reference", hp)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        with_callbacks(patch, CrashAt(epoch))
        with pytest.raises(Crash):
            run_train(digits_prepared, tmp, "killed", hp)
    trained = reference["epochs_trained"]
    saved = (epoch - 1) if epoch else trained
    checkpoint = torch.load(tmp / ".runway/train/last.ckpt", weights_only=True)
    assert checkpoint["epoch"] + 1 == saved  # written at the end of that epoch
    assert "InMemoryData" in checkpoint  # the shuffle generator's state
    client = MlflowClient()
    killed = _last_run_id(client)
    capsys.readouterr()

    resumed = run_train(digits_prepared, tmp, "resumed", hp)
    out = capsys.readouterr().out
    assert f"from .runway/train/last.ckpt (saved in epoch {saved}, " in out
    assert epoch_lines(out) == resumed_epochs
    assert resumed["run_id"] == killed
    assert resumed["epochs_trained"] == trained
    assert (tmp / "resumed/model.pt").read_bytes() == (tmp / "reference/model.pt").read_bytes()
    assert metric_histories(client, killed) == metric_histories(client, reference["run_id"])
    assert [step for step, _ in metric_histories(client, killed)["val/loss"]] == list(
        range(trained)
    )


def _last_run_id(client) -> str:
    (experiment,) = [e for e in client.search_experiments() if e.name == "t"]
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    return runs[0].info.run_id


def test_the_run_logs_epoch_metrics_device_and_determinism(digits_prepared, mlflow_store, capsys):
    from mlflow.tracking import MlflowClient

    assert not hasattr(stage, "BatchedMLFlowLogger")  # Lightning's own MLFlowLogger
    run = run_train(digits_prepared, mlflow_store, "out", HP.model_copy(update={"max_epochs": 3}))
    out = capsys.readouterr().out
    assert "[train] device cpu (" in out
    client = MlflowClient()
    tags = client.get_run(run["run_id"]).data.tags
    assert tags["device"].startswith("cpu (") and tags["determinism"] == "on"
    history = client.get_metric_history(run["run_id"], "val/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert client.get_metric_history(run["run_id"], "epoch") == []
    assert client.get_metric_history(run["run_id"], "step") == []
    assert run["epochs_trained"] == 3
    # Runs are told apart by name: model, lr and batch size, and where each came from.
    lr = HP.lr
    assert client.get_run(run["run_id"]).info.run_name == f"train · cnn · lr {lr:.1e} · bs 64"
    assert tags["mlflow.note.content"] == (
        f"Final training on digits ({len(digits_prepared.tables['train'])} training samples) "
        "with params.yaml values (no tuning)."
    )


def test_tuned_values_are_named_as_tuned_and_dvc_experiments_tagged(
    digits_prepared, mlflow_store, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    out = mlflow_store / "tuned"
    out.mkdir()
    hp = HP.model_copy(update={"max_epochs": 1, "lr": 0.0021})
    run = train(hp, MODEL, digits_prepared, "t", out, Resume("key"), frozenset({"train.lr"}))
    found = MlflowClient().get_run(run["run_id"])
    assert found.info.run_name == "train · cnn · lr 2.1e-03 (tuned) · bs 64 · brisk-lark"
    assert found.data.tags["dvc.exp_name"] == "brisk-lark"
    assert found.data.tags["mlflow.note.content"].endswith(
        "with tuned values (train.lr) from reports/tune/best_params.json, the rest from "
        "params.yaml."
    )


def test_the_model_is_the_best_epoch_not_the_last(digits_prepared, mlflow_store, monkeypatch):
    class Weights(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[float, dict]] = []

        def on_validation_end(self, trainer, pl_module):
            state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
            self.epochs.append((trainer.callback_metrics["val/loss"].item(), state))

    weights = Weights()
    with_callbacks(monkeypatch, weights)
    run = run_train(digits_prepared, mlflow_store, "out", EARLY_STOP)
    losses = [loss for loss, _ in weights.epochs]
    best = losses.index(min(losses))
    assert best != len(losses) - 1
    assert run["best_val/loss"] == pytest.approx(losses[best])
    saved = torch.load(mlflow_store / "out/model.pt", weights_only=True)
    for key, value in weights.epochs[best][1].items():
        assert torch.equal(saved[key], value), key


def test_resume_modes_and_unusable_checkpoints(tmp_path, capsys):
    from pipeline.io import write_json

    resume = Resume("key", tmp_path / "state")
    with pytest.raises(StageError, match=r"train.resume is 'must' but .*last.ckpt does not exist"):
        resume.find("must")
    assert resume.find("auto") == (None, None)

    resume.dir.mkdir()
    write_json(resume.state, {"key": "other", "run_id": "r"})
    torch.save({"epoch": 0, "global_step": 1}, resume.last)
    with pytest.raises(StageError, match="is from a run with other params or data"):
        resume.find("must")
    assert resume.find("auto") == (None, None)
    assert "not resuming" in capsys.readouterr().out and not resume.dir.exists()

    resume.dir.mkdir()
    write_json(resume.state, {"key": "key", "run_id": "r"})
    resume.last.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(StageError, match="last.ckpt: cannot resume from this checkpoint"):
        resume.find("must")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"epoch": 0, "global_step": 1, "state_dict": Payload()}, resume.last)
    with pytest.raises(StageError, match="refused: it needs pickle to load"):
        resume.find("auto")
    assert not (tmp_path / "pwned").exists()

    torch.save({"epoch": 2, "global_step": 50}, resume.last)
    assert resume.find("must") == (resume.last, "r")
    assert "(saved in epoch 3, after 50 optimizer steps)" in capsys.readouterr().out


def test_ops_without_a_deterministic_kernel_are_recorded(digits_prepared):
    import warnings

    from pipeline.stages.train import determinism
    from pipeline.training import fit, nondeterministic_ops

    class Warns(pl.Callback):
        """What torch warns on a GPU with deterministic 'warn' (e.g. the CNN's pooling)."""

        def on_train_epoch_end(self, trainer, pl_module):
            warnings.warn(
                "adaptive_avg_pool2d_backward_cuda does not have a deterministic "
                "implementation, but you set 'torch.use_deterministic_algorithms(True, "
                "warn_only=True)'.",
                UserWarning,
                stacklevel=1,
            )

    hp = TrainParams(max_epochs=1, accelerator="cpu")
    with pytest.warns(UserWarning, match="deterministic"), nondeterministic_ops() as ops:
        fit(hp, MODEL, digits_prepared, [Warns()])
    assert ops == ["adaptive_avg_pool2d_backward_cuda"]
    assert determinism(hp, ops) == "partial (adaptive_avg_pool2d_backward_cuda)"
    assert determinism(hp, []) == "on"
    assert determinism(hp.model_copy(update={"deterministic": False}), []) == "off"


def test_a_params_value_that_tuning_replaces_is_named_with_how_to_keep_it():
    from pipeline.config import parse_params, with_tuned

    params = parse_params({"train": {"lr": 0.01, "batch_size": 64}, "model": {"channels": 32}})
    tuned = {"train.lr": 0.00214, "train.batch_size": 64, "model.channels": 48}
    hp, model = with_tuned(params.train, params.model, tuned)
    rows = stage.values(params, hp, model, frozenset(tuned))
    assert stage.overridden(rows) == (
        "tuning decided train.lr 0.00214 (params.yaml: 0.01), model.channels 48 "
        "(params.yaml: 32) (reports/tune/best_params.json); to train with params.yaml's "
        "values set tune.n_trials: 0, or narrow tune.search_space (e.g. lr: [0.01, 0.01], "
        "channels: [32])"
    )  # batch_size: the same value either way, nothing to say
    by_key = {row["key"]: row for row in rows}
    assert by_key["train.lr"] == {
        "key": "train.lr",
        "requested": 0.01,
        "effective": 0.00214,
        "source": "tuned",
    }
    assert by_key["train.batch_size"]["source"] == "tuned"
    assert by_key["train.seed"] == {
        "key": "train.seed",
        "requested": None,
        "effective": 42,
        "source": "default",
    }
    assert by_key["model.dropout"]["source"] == "default"
    assert "train.resume" not in by_key
    untuned = stage.values(params, params.train, params.model, frozenset())
    assert stage.overridden(untuned) is None
    assert {r["key"]: r["source"] for r in untuned if r["source"] == "params"} == {
        "train.lr": "params",
        "train.batch_size": "params",
        "model.channels": "params",
    }


def test_a_resumed_run_sends_mlflow_the_epochs_it_lost(mlflow_store, digits_prepared):
    """Metrics that never reached MLflow before the process died (sent asynchronously) are
    in the checkpoint, and the resumed run sends them at their steps."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    from pipeline.training import fit

    resume = Resume("lost", mlflow_store / "ckpt")
    hp = HP.model_copy(update={"max_epochs": 2, "patience": 2})
    callbacks, _ = stage.train_callbacks(hp, resume)
    fit(hp, MODEL, digits_prepared, callbacks, logger=False)  # two epochs, nothing sent
    mlflow.set_experiment("lost")
    with mlflow.start_run() as run:
        pass
    logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)
    more = hp.model_copy(update={"max_epochs": 3, "patience": 3})
    callbacks, _ = stage.train_callbacks(more, resume)
    fit(more, MODEL, digits_prepared, callbacks, logger=logger, ckpt_path=resume.last)
    assert logged_steps(mlflow.MlflowClient(), run.info.run_id) == EVERY_EPOCH_ONCE


def test_an_epochs_metrics_reach_mlflow_only_after_its_checkpoint(mlflow_store, digits_prepared):
    """Lightning hands the logger an epoch's metrics before the epoch's checkpoints are
    written. Sent then, a process killed before ``last.ckpt`` would resume from the epoch
    before, train the epoch again and give MLflow a second point at its step. The stage's
    logger sends them once ``last.ckpt`` is written: a callback that runs between the two
    (Lightning runs checkpoint callbacks last) finds only the earlier epochs in MLflow."""
    import mlflow

    from pipeline.training import fit

    mlflow.set_experiment("order")
    with mlflow.start_run() as run:
        pass
    client = mlflow.MlflowClient()
    seen: list[list[int]] = []

    class BeforeTheCheckpoints(pl.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            mlflow.flush_async_logging()
            history = client.get_metric_history(run.info.run_id, "val/loss")
            seen.append(sorted(m.step for m in history))

    hp = HP.model_copy(update={"max_epochs": 3, "patience": 3})
    callbacks, _ = stage.train_callbacks(hp, Resume("order", mlflow_store / "ckpt"))
    logger = stage.CheckpointedLogger(
        tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id, synchronous=False
    )
    fit(hp, MODEL, digits_prepared, [*callbacks, BeforeTheCheckpoints()], logger=logger)
    mlflow.flush_async_logging()
    assert seen == [[], [0], [0, 1]]
    assert logged_steps(client, run.info.run_id) == EVERY_EPOCH_ONCE
    assert logger.held == []


def test_where_the_data_lives_is_no_reason_to_start_afresh():
    """train.data_placement changes how fast, not what, a run trains: same resume key."""
    key = stage.resume_key(HP, MODEL)
    assert stage.resume_key(HP.model_copy(update={"data_placement": "host"}), MODEL) == key
    assert stage.resume_key(HP.model_copy(update={"lr": 0.01}), MODEL) != key


def test_processes_per_host_counts_what_lightning_starts(monkeypatch):
    """The `auto` memory rule counts one copy of the splits per training process on a machine:
    train.devices as given, or for `auto` as many as Lightning starts (every GPU on a CUDA
    machine, one process on a CPU), and never none."""
    assert stage.processes_per_host(HP.model_copy(update={"devices": 3})) == 3
    for accelerator in ("cpu", "cuda"):
        hp = HP.model_copy(update={"devices": "auto", "accelerator": accelerator})
        if accelerator == "cuda" and not torch.cuda.is_available():
            assert stage.processes_per_host(hp) == 1  # train then stops: no CUDA GPU
            continue
        trainer = pl.Trainer(accelerator=accelerator, devices="auto", logger=False)
        assert stage.processes_per_host(hp) == trainer.num_devices
    # A machine with 4 GPUs, as Lightning's public count would see it (none here).
    from lightning.pytorch.accelerators import CUDAAccelerator

    on_gpus = HP.model_copy(update={"devices": "auto", "accelerator": "cuda"})
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 4))
    assert stage.processes_per_host(on_gpus) == 4
