"""The team benchmark's params.yaml edits (benchmarks/team.py)."""

from __future__ import annotations

import shutil

import yaml

from benchmarks.common import ROOT
from benchmarks.team import FIXED, edit


def test_edit_sets_keys_and_merges_the_search_space_key_by_key(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    space = yaml.safe_load((ROOT / "params.yaml").read_text())["tune"]["search_space"]
    edit(tmp_path, "tune", n_trials=12, pruner="none", search_space=FIXED)
    tune = yaml.safe_load((tmp_path / "params.yaml").read_text())["tune"]
    assert (tune["n_trials"], tune["pruner"]) == (12, "none")
    # The cost-setting keys hold one value each; lr, dropout and weight decay stay as they were.
    assert tune["search_space"] == {**space, **FIXED}
    assert tune["search_space"]["batch_size"] == [64] and space["batch_size"] != [64]
