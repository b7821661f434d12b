"""A failed run loses nothing: through `dvc repro` (and `make repro`), a bad params.yaml or a
failing stage leaves every earlier output and dvc.lock byte-identical, and a stage run
without its inputs says which stage to run first."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import TINY, copy_project, edit_params, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("failures")]

KEPT = ("data", "models", "reports")


def snapshot(project: Path) -> dict[str, str]:
    """sha256 of dvc.lock and of every file under data/, models/ and reports/."""
    files = [project / "dvc.lock"]
    for folder in KEPT:
        files += [p for p in (project / folder).rglob("*") if p.is_file()]
    return {
        p.relative_to(project).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("failures"))
    edit_params(project, {**TINY, "tune": {"n_trials": 2, "epochs": 1}})
    run(["dvc", "repro"], project)
    return project


@contextlib.contextmanager
def changed(project: Path, changes: dict):
    saved = (project / "params.yaml").read_text()
    edit_params(project, changes)
    try:
        yield
    finally:
        (project / "params.yaml").write_text(saved)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "] error: " in line]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"lr": -0.5}}, "train.lr: Input should be greater than 0"),
        ({"tune": {"sampler": "bayes"}}, "tune.sampler: 'bayes' is not allowed"),
        ({"register": {"min_delta": 2}}, "register.min_delta: Input should be less than or equal"),
    ],
)
def test_bad_params_are_refused_before_dvc_removes_anything(project, change, message):
    before = snapshot(project)
    assert "reports/tune/best_params.json" in before and "models/model.pt" in before
    with changed(project, change):
        for command in (["dvc", "repro"], ["make", "-o", ".venv/.installed", "repro"]):
            result = run(command, project, check=False)
            assert result.returncode != 0, command
            (line,) = error_lines(result)
            assert line.startswith("[params] error: params.yaml: ") and message in line, line
            assert "Running stage 'tune'" not in result.stdout
            assert snapshot(project) == before, command


def locked(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def test_a_failed_gate_keeps_the_last_good_data(project):
    before, lock = snapshot(project), locked(project)
    with changed(project, {"validate": {"min_per_class": 1000}}):
        result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert line.startswith(
        "[validate] error: 10 check(s) failed: class '0' has 178 samples, fewer than "
        "validate.min_per_class=1000; class '1' has"
    )
    assert "previous outputs are unchanged" in line
    assert "Running stage 'tune'" not in result.stdout
    # The params check passed and DVC recorded that; nothing else changed.
    assert {**snapshot(project), "dvc.lock": ""} == {**before, "dvc.lock": ""}
    assert {k: v for k, v in locked(project).items() if k != "params"} == {
        k: v for k, v in lock.items() if k != "params"
    }
    failed = project / ".runway/validation-failed"
    assert (failed / "data_docs/index.html").is_file()
    assert '"success": false' in (failed / "summary.json").read_text()
    # Back to the old params: only the params check runs again.
    again = run(["dvc", "repro"], project)
    assert (
        "Running stage 'params'" in again.stdout and "Running stage 'validate'" not in again.stdout
    )
    assert snapshot(project) == before


def test_a_failed_register_keeps_its_record(project):
    metrics = project / "reports/evaluate/metrics.json"
    good = metrics.read_text()
    metrics.write_text('{"test/accuracy": "high"}\n')  # an evaluation gone wrong
    try:
        before = snapshot(project)
        # -s: register alone (a plain repro would first re-run evaluate and mend the file)
        result = run(["dvc", "repro", "-s", "register"], project, check=False)
        assert result.returncode != 0
        (line,) = error_lines(result)
        assert line.startswith("[register] error: reports/evaluate/metrics.json: expected")
        assert snapshot(project) == before  # register.json (not in DVC's cache) is still there
    finally:
        metrics.write_text(good)
    assert "up to date" in run(["dvc", "status"], project).stdout  # as dvc.lock says


def stage(project: Path, name: str):
    return run([sys.executable, "-m", f"pipeline.stages.{name}"], project, check=False)


@pytest.mark.parametrize(
    "name, message",
    [
        ("validate", "data/raw/samples.parquet not found: run the ingest stage first"),
        ("tune", "data/prepared/manifest.json not found: run the validate stage first"),
        ("train", "data/prepared/manifest.json not found: run the validate stage first"),
        ("evaluate", "data/prepared/manifest.json not found: run the validate stage first"),
        ("register", "models/run.json not found: run the train stage first"),
    ],
)
def test_a_stage_without_its_inputs_says_which_stage_to_run(tmp_path, name, message):
    project = copy_project(tmp_path)
    result = stage(project, name)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert error_lines(result) == [f"[{name}] error: {message}"]


def test_evaluate_without_a_run_record_says_to_run_train(project, tmp_path):
    record = project / "models/run.json"
    saved = record.read_bytes()
    record.unlink()
    try:
        result = stage(project, "evaluate")
    finally:
        record.write_bytes(saved)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert error_lines(result) == [
        "[evaluate] error: models/run.json not found: run the train stage first"
    ]


def test_a_raw_table_without_sample_ids_fails_the_gate_in_one_line(tmp_path):
    project = copy_project(tmp_path)
    run([sys.executable, "-m", "pipeline.stages.ingest"], project)
    raw = project / "data/raw/samples.parquet"
    pd.read_parquet(raw).drop(columns="sample_id").to_parquet(raw, index=False)
    result = stage(project, "validate")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = error_lines(result)
    assert (
        "6 check(s) failed: columns: the table's 65 columns are not the 67 expected: missing "
        "['sample_id', 'split']; samples: expect_column_values_to_not_be_null on column "
        "'sample_id'"
    ) in line
    assert "No prepared data written" in line
    assert (
        "[validate] FAILED columns: the table's 65 columns are not the 67 expected: "
        "missing ['sample_id', 'split']\n"
    ) in result.stdout
    assert not (project / "data/prepared").exists()


def test_a_value_tuning_searches_is_not_a_dependency_of_tune(project):
    """Every trial samples its own lr, batch size, optimizer, weight decay, channels and
    dropout: changing their params.yaml values reruns train (where a tuned value may replace
    them, and says so), never the study."""
    import json

    for change in ({"train": {"lr": 0.05, "optimizer": "sgd"}}, {"model": {"dropout": 0.33}}):
        with changed(project, change):
            status = json.loads(run(["dvc", "status", "--json"], project).stdout)
        assert "tune" not in status and "train" in status, (change, status)
    with changed(project, {"tune": {"epochs": 3}}):
        status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "tune" in status


def test_a_code_change_tune_depends_on_runs_new_trials(project):
    """DVC reruns tune when code it depends on changes; the study then starts afresh instead
    of resuming the trials the old code ran, and the old code's study is resumed again once
    the code is back."""
    import csv

    def trial_runs() -> set[str]:
        with open(project / "reports/tune/trials.csv", newline="") as f:
            return {row["user_attrs_mlflow_run_id"] for row in csv.DictReader(f)}

    cnn = project / "pipeline/models/cnn.py"
    source, first = cnn.read_text(), trial_runs()
    try:
        cnn.write_text(source + "# changed\n")
        run(["dvc", "repro", "tune"], project)
        changed_code = trial_runs()
    finally:
        cnn.write_text(source)
        run(["dvc", "repro", "tune"], project)
    assert len(first) == len(changed_code) == 2 and not first & changed_code
    assert trial_runs() == first
