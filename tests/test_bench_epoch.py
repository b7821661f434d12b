"""The epoch comparison of `make bench` (benchmarks/epoch.py): the hand-written loop it times
the train stage against does the same work, files included."""

from __future__ import annotations

import math

import torch

from benchmarks.common import digits_prepared
from benchmarks.epoch import Workload, hand_loop, same, stage_fit

EPOCHS = 3


def test_the_hand_loop_writes_what_the_stage_writes_and_computes_the_same(tmp_path):
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
    _, stage_losses, _ = stage_fit(work, tmp_path / "stage")
    assert same(stage_losses, losses)


def test_without_files_the_hand_loop_writes_none(tmp_path):
    work = Workload("digits", digits_prepared(), 64, 2)
    hand_loop(work, tmp_path, files=False)
    assert not list(tmp_path.glob("*.pt"))
