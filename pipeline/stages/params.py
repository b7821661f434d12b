"""Params: check all of params.yaml before any stage's outputs are touched.

DVC removes a stage's outputs just before it runs the stage. This stage comes first (every
other stage depends on its output), reads every section and validates it with
:mod:`pipeline.config`, so a bad value stops ``dvc repro`` with one line naming the key while
every earlier result is still in place. Its output never changes, so passing the check makes
no other stage rerun.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.io import run_stage, write_text

CHECKED = Path(".runway/params.ok")


def main() -> None:
    load_params()
    write_text(CHECKED, "params.yaml passed the checks of pipeline/config.py\n")
    print("[params] params.yaml is valid")


if __name__ == "__main__":
    run_stage("params", main)
