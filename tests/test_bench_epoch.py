"""The epoch comparison of `make bench` (benchmarks/epoch.py): the hand-written loop it times
the train stage against does the same work, files included."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmarks.common import digits_prepared
from benchmarks.epoch import Workload, bare_fit, compare, hand_loop, same, stage_fit

EPOCHS = 3


def test_the_hand_loop_writes_what_the_stage_writes_and_computes_the_same(tmp_path, recwarn):
    work = Workload("digits", digits_prepared(), 64, EPOCHS)
    times, losses = hand_loop(work, tmp_path / "hand")
    assert len(times) == EPOCHS and all(t > 0 for t in times)

    last = torch.load(tmp_path / "hand" / "last.pt", weights_only=True)
    assert sorted(last) == ["epoch", "model", "optimizer", "rng", "schedule"]
    assert last["epoch"] == EPOCHS - 1
    steps = EPOCHS * math.ceil(len(work.data.tensors["train"][0]) / work.batch_size)
    assert all(s["step"].item() == steps for s in last["optimizer"]["state"].values())
    assert last["schedule"]["last_epoch"] == EPOCHS
    assert sorted(last["rng"]) == ["shuffle", "torch"]
    best = torch.load(tmp_path / "hand" / "best.pt", weights_only=True)
    assert best.keys() == last["model"].keys()
    last_is_best = losses.index(min(losses)) == EPOCHS - 1
    assert all(torch.equal(best[k], last["model"][k]) for k in best) == last_is_best
    assert not list((tmp_path / "hand").glob("*.tmp"))  # each moved into place

    # The stage trains the same: the same val/loss every epoch.
    recwarn.clear()
    _, stage_losses, _ = stage_fit(work, tmp_path / "stage")
    assert same(stage_losses, losses)
    # ...and, as every fit, keeps Lightning's notes on what the stage does on purpose out of
    # the output (make bench printed these two per fit).
    noted = [str(w.message) for w in recwarn]
    assert [m for m in noted if "ckpt_path" in m] == []


def test_without_files_the_hand_loop_writes_none(tmp_path):
    work = Workload("digits", digits_prepared(), 64, 2)
    hand_loop(work, tmp_path, files=False)
    assert not list(tmp_path.glob("*.pt"))


def test_both_sides_train_the_workloads_model(tmp_path):
    mlp = Workload("digits", digits_prepared(), 64, 2, model="mlp")
    _, hand = hand_loop(mlp)
    _, lightning = bare_fit(mlp, tmp_path)
    assert same(hand, lightning)
    _, cnn = hand_loop(dataclasses.replace(mlp, model="cnn"))
    assert not same(hand, cnn)


def test_a_per_step_row_gives_ms_per_optimizer_step():
    work = Workload("digits", digits_prepared(), 64, 3)
    assert work.steps() == 20  # 1,257 training images in batches of 64
    assert dataclasses.replace(work, train_batches=5).steps() == 5

    row = compare(
        "per step",
        lambda: ([9.0, 0.04, 0.05, 0.04], [0.5, 0.4, 0.3]),  # median after the first: 0.04 s
        lambda: ([9.0, 0.03, 0.03, 0.02], [0.5, 0.4, 0.3]),  # 0.03 s
        3,
        None,
        per_step=work,
    )
    assert (row["unit"], row["ours"], row["reference"]) == ("ms", 2.0, 1.5)
    assert (row["ratio"], row["same_val_losses"]) == (1.333, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_make_bench_on_a_gpu_this_machine_lacks_stops_in_one_line(tmp_path, capsys):
    from benchmarks import run

    with pytest.raises(SystemExit) as stop:
        run.main(["--accelerator", "cuda", "--only", "epoch", "--out", str(tmp_path / "b.json")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m benchmarks.run: error: --accelerator: 'cuda' needs a CUDA GPU, and this "
        "machine has none (torch.cuda.is_available() is False); use auto (a GPU where there is "
        "one, else the CPU) or cpu"
    )
    assert not (tmp_path / "b.json").exists()
