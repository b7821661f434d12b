"""The model and seeded training."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelParams, TrainParams, parse_params
from pipeline.models.cnn import build_cnn
from pipeline.stages.train import merged_params
from pipeline.training import fit


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 32, 32]])
def test_cnn_takes_raw_pixels_of_any_small_size(shape):
    net = build_cnn(shape, 10, [0.0, 255.0], channels=8, dropout=0.1).eval()
    out = net(torch.full((4, *shape), 255.0))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_training_is_seeded_and_learns(digits_prepared):
    hp = TrainParams(max_epochs=3, batch_size=32, accelerator="cpu")
    model = ModelParams(channels=8)
    first, _ = fit(hp, model, digits_prepared, [])
    second, _ = fit(hp, model, digits_prepared, [])
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x, y = digits_prepared.tensors["val"]
    first.eval()
    with torch.no_grad():
        accuracy = (first(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # three epochs already far above chance (0.1)


def test_best_params_override_train_and_model_sections(tmp_path):
    best = tmp_path / "best_params.json"
    best.write_text('{"lr": 0.01, "optimizer": "sgd", "channels": 16, "model": "mlp"}')
    params = parse_params({"train": {"lr": 0.001}})
    hp, model = merged_params(params, best)
    assert (hp.lr, hp.optimizer, hp.max_epochs) == (0.01, "sgd", TrainParams().max_epochs)
    assert (model.name, model.channels, model.dropout) == ("mlp", 16, ModelParams().dropout)
    assert merged_params(params, tmp_path / "absent.json")[0].lr == 0.001
    best.write_text('{"learning_rate": 0.01}')
    with pytest.raises(Exception, match="learning_rate"):
        merged_params(params, best)
    best.write_text('{"model": "vgg"}')
    with pytest.raises(Exception, match="model.name: 'vgg' is not allowed"):
        merged_params(params, best)


class FakeClock:
    """A clock that moves ``tick`` seconds each time it is read."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_throttle_spends_at_most_its_budget_and_waits_at_most_max_wait():
    from pipeline.training import Throttle

    clock = FakeClock()
    throttle = Throttle(budget=0.01, max_wait=2.0, clock=clock)
    assert throttle.due()  # the first time always
    with throttle.timed():
        clock.now += 0.005  # a 5 ms job ...
    clock.now += 0.49
    assert not throttle.due()
    clock.now += 0.01
    assert throttle.due()  # ... waits 0.5 s: 1% of the time
    with throttle.timed():
        clock.now += 1.0  # a slow job would wait 100 s, but max_wait caps it
    clock.now += 1.99
    assert not throttle.due()
    clock.now += 0.01
    assert throttle.due()


def test_resume_point_writes_the_latest_epoch_when_interrupted(digits_prepared, tmp_path):
    """Between throttled writes the state is kept in memory; SIGTERM (Terminated) writes the
    last finished epoch's, which carries the best weights so far."""
    import lightning.pytorch as pl

    from pipeline.io import Terminated
    from pipeline.stages.train import BestWeights, ResumePoint
    from pipeline.training import Throttle

    class TerminateIn(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 4 and batch_idx == 2:
                raise Terminated()

    clock = FakeClock(tick=0.005)  # a write "takes" 5 ms: after the first, none is due
    last = tmp_path / "resume" / "last.ckpt"
    point = ResumePoint(last, Throttle(clock=clock))
    best = BestWeights("val/loss", "min")
    hp = TrainParams(max_epochs=8, patience=8, batch_size=64, accelerator="cpu")
    with pytest.raises(Terminated):
        fit(hp, ModelParams(channels=8), digits_prepared, [best, point, TerminateIn()])
    state = torch.load(last, weights_only=True)
    assert point.saved_epoch == 4 and state["epoch"] == 3  # epochs 1-4 finished, 5 interrupted
    kept = next(v for k, v in state["callbacks"].items() if k.startswith("BestWeights"))
    assert kept["epoch"] == best.epoch and kept["score"] == best.score
    for name, tensor in best.weights.items():
        assert torch.equal(kept["weights"][name], tensor)


def test_resume_point_writes_when_due_and_the_last_epoch_at_the_end(digits_prepared, tmp_path):
    from pipeline.stages.train import ResumePoint
    from pipeline.training import Throttle

    clock = FakeClock(tick=0.005)  # a write "takes" 5 ms, the epochs (almost) no time
    point = ResumePoint(tmp_path / "last.ckpt", Throttle(clock=clock))
    written, write = [], point.write

    def counting_write():
        before = point.saved_epoch
        write()
        if point.saved_epoch != before:
            written.append(point.saved_epoch)

    point.write = counting_write
    hp = TrainParams(max_epochs=5, patience=5, accelerator="cpu")
    fit(hp, ModelParams(channels=8), digits_prepared, [point])
    assert written == [1, 5]  # the first epoch, then none due until training ended
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 4


def test_batched_logger_sends_every_epoch_in_few_calls(digits_prepared, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.stages.train import BatchedMLFlowLogger
    from pipeline.training import Throttle

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = BatchedMLFlowLogger(
        experiment_name="t", tracking_uri=uri, throttle=Throttle(clock=FakeClock(tick=0.01))
    )
    calls = []
    flush = logger.flush
    logger.flush = lambda: (calls.append(len(logger.pending)), flush())
    hp = TrainParams(max_epochs=5, patience=5, accelerator="cpu")
    fit(hp, ModelParams(channels=8), digits_prepared, [], logger=logger)
    history = MlflowClient(uri).get_metric_history(logger.run_id, "val/loss")
    assert sorted(m.step for m in history) == sorted({m.step for m in history})
    assert len(history) == 5  # every epoch arrived ...
    assert len(calls) == 2  # ... in two calls: the first epoch, then the rest at the end
    train = MlflowClient(uri).get_metric_history(logger.run_id, "train/acc")
    assert [m.step for m in sorted(train, key=lambda m: m.step)] == sorted(m.step for m in history)
