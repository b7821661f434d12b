"""Bad input, faults and security, each through the real stage (numbered as in the README's
"What stops a run" list). Expected unless a test says otherwise: exit status 1, one line
naming the file, row, column or params key, no partial output, dvc.lock unchanged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.tracking import dvc_hash
from tests.conftest import TINY, copy_project, edit_params, project_env, run
from tests.formats import write_idx, write_image_folder, write_iris_csv, write_mnist

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hardening")]

STAGE_OUTPUTS = {
    "ingest": "data/raw",
    "validate": "data/prepared",
    "tune": "reports/tune",
    "train": "models",
    "evaluate": "reports/evaluate",
    "register": "reports/register.json",
}


def stage(project: Path, name: str, check: bool = False) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"pipeline.stages.{name}"], project, check=check)


def fails(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The stage exited 1 with one error line containing every needle."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "] error: " in line]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def mlflow_runs(project: Path, experiment: str = "runway-digits"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], order_by=["start_time DESC"])


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "p")


def raw_table(project: Path) -> pd.DataFrame:
    stage(project, "ingest", check=True)
    return pd.read_parquet(project / "data/raw/samples.parquet")


def save_raw(project: Path, table: pd.DataFrame) -> None:
    table.to_parquet(project / "data/raw/samples.parquet", index=False)


# --- Bad input ------------------------------------------------------------------------


def test_01_source_missing_empty_or_nothing_left_after_cleaning(project):
    edit_params(project, {"data": {"source": "csv", "path": "data/external/t.csv"}})
    fails(stage(project, "ingest"), "data/external/t.csv: CSV file not found")
    (project / "data/external/t.csv").write_text("")
    fails(stage(project, "ingest"), "data/external/t.csv: the file is empty")
    assert not (project / "data/raw").exists()
    (project / "data/external/t.csv").write_text("a,b,label\n,1,x\n2,,y\n,,x\n")
    stage(project, "ingest", check=True)
    fails(stage(project, "validate"), "no rows left after cleaning (3 quarantined)")
    assert not (project / "data/prepared").exists()
    edit_params(project, {"data": {"source": "mnist", "path": None}})
    fails(stage(project, "ingest"), "data/external/mnist: train-images-idx3-ubyte[.gz]")


def test_02_truncated_or_non_image_files_are_named(project):
    root = project / "data/external/pics"
    write_image_folder(root, per_class=10, classes=2, size=16)
    truncated = sorted((root / "one").glob("*.png"))[1]
    truncated.write_bytes(truncated.read_bytes()[:80])
    fake = root / "zero" / "fake.jpg"
    fake.write_text("<html>not a jpeg</html>")
    edit_params(project, {"data": {"source": "image_folder", "path": str(root)}})
    line = fails(stage(project, "ingest"), "2 of 21 image file(s)", truncated.name, "fake.jpg")
    assert "cannot be decoded" in line
    assert not (project / "data/raw").exists()


def test_03_wrong_image_shape_names_the_file_and_shape(project):
    folder = project / "data/external/mnist"
    write_mnist(folder, gz=False)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((80, 20, 20), dtype=np.uint8))
    edit_params(project, {"data": {"source": "mnist"}})
    fails(
        stage(project, "ingest"), "t10k-images-idx3-ubyte: images are 20×20, the train images 28×28"
    )
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((80, 784), dtype=np.uint8))
    fails(stage(project, "ingest"), "expected N × height × width images, got shape (80, 784)")
    assert not (project / "data/raw").exists()
    # A raw table whose pixel columns do not fit the manifest's image shape.
    edit_params(project, {"data": {"source": "digits"}})
    table = raw_table(project)
    save_raw(project, table.drop(columns=[f"px_{i}" for i in range(48, 64)]))
    result = stage(project, "validate")
    fails(result, "check(s) failed")
    missing = [f"px_{i}" for i in range(48, 64)]
    assert (
        "FAILED columns: the table's 51 columns are not the 67 expected: "
        f"missing {missing[:10]} and 6 more\n"
    ) in result.stdout
    assert not (project / "data/prepared").exists()


def test_04_05_09_bad_labels_and_non_finite_features_are_quarantined_with_reasons(project):
    table = raw_table(project).astype({"label": "float64"})
    bad = {0: ("label", 10), 1: ("label", -1), 2: ("label", np.nan), 3: ("label", 2.5)}
    bad |= {4: ("px_10", np.nan), 5: ("px_20", np.inf), 6: ("px_30", -np.inf)}
    for row, (column, value) in bad.items():
        table.loc[row, column] = value
    save_raw(project, table)
    stage(project, "validate", check=True)  # 7 of 1,797 rows: under the threshold, it goes on
    quarantine = pd.read_csv(project / "reports/validation/quarantine.csv")
    reasons = dict(zip(quarantine["row"], quarantine["reason"], strict=True))
    assert reasons[0] == "label outside the class set [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]: 10.0"
    assert reasons[1] == "label outside the class set [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]: -1.0"
    assert reasons[2] == "label is missing: nan"
    assert reasons[3] == "label is not an integer: 2.5"
    assert reasons[4] == "non-finite feature: px_10=nan"
    assert reasons[5] == "non-finite feature: px_20=inf"
    assert reasons[6] == "non-finite feature: px_30=-inf"
    assert set(quarantine["sample_id"]) == set(table.loc[list(bad), "sample_id"])
    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert summary["rows_quarantined"] == 7 and summary["rows_out"] == 1790
    prepared = pd.concat(pd.read_parquet(p) for p in (project / "data/prepared").glob("*.parquet"))
    assert not prepared["sample_id"].isin(quarantine["sample_id"]).any()
    assert prepared["label"].dtype == np.int64
    run_ = mlflow_runs(project)[0]
    assert run_.data.metrics["validate/rows_quarantined"] == 7
    # A label stored as text: string labels in a numeric table.
    text = raw_table(project).astype({"label": str})
    text.loc[8, "label"] = "three"
    save_raw(project, text)
    stage(project, "validate", check=True)
    quarantine = pd.read_csv(project / "reports/validation/quarantine.csv")
    assert quarantine["reason"].tolist() == ["label is not a number: 'three'"]


def test_05_the_feature_suite_checks_finiteness_itself(digits_table, manifest, tmp_path):
    """Range expectations skip nulls, so the gate counts non-finite values explicitly."""
    from pipeline.validation.suite import run_suites

    table = digits_table.copy()
    table.insert(2, "split", "train")
    table.loc[5, "px_3"] = np.nan
    table.loc[6, "px_4"] = np.inf
    result = run_suites(table, manifest, 1, tmp_path)
    (line,) = [f for f in result.failures if "column 'non_finite'" in f]
    assert "feature ['px_3', 'px_4']" in line


def test_06_schema_drift_missing_extra_columns_and_dtypes(project):
    table = raw_table(project)
    drifted = table.drop(columns=["px_5"]).assign(extra=1.0)
    drifted["px_7"] = drifted["px_7"].astype("float64")
    save_raw(project, drifted)
    result = stage(project, "validate")
    fails(result, "check(s) failed")
    assert (
        "FAILED columns: the table's 67 columns are not the 67 expected: "
        "missing ['px_5']; unexpected ['extra']\n"
    ) in result.stdout
    assert "column 'dtype'" in result.stdout and "feature ['px_7']" in result.stdout
    assert not (project / "data/prepared").exists()
    # A CSV whose columns drift from the declared ones stops at ingest.
    write_iris_csv(project / "data/external/iris.csv")
    expected = ["sepal_length", "sepal_width", "petal_length", "petal_width", "leaf_area"]
    edit_params(
        project,
        {
            "data": {
                "source": "csv",
                "path": "data/external/iris.csv",
                "label_column": "species",
                "features": expected[1:],
            }
        },
    )
    fails(stage(project, "ingest"), "missing ['leaf_area']; extra ['sepal_length']")


def test_07_class_below_minimum_or_absent_from_a_split(project):
    table = raw_table(project)
    few = pd.concat([table[table["label"] != 3], table[table["label"] == 3].head(8)])
    save_raw(project, few)
    result = stage(project, "validate")
    fails(result, "check(s) failed")
    fails(
        result, "1 check(s) failed: class '3' has 8 samples, fewer than validate.min_per_class=20"
    )
    # Class 5 only in train and val: the test split has none of it.
    from pipeline.config import SplitParams
    from pipeline.validation.split import assign_splits

    splits = assign_splits(table["sample_id"], SplitParams())
    save_raw(project, table[~((table["label"] == 5) & (splits == "test"))])
    result = stage(project, "validate")
    fails(result, "check(s) failed")
    fails(result, "1 check(s) failed: class '5' has no sample in the test split")


def test_08_duplicates_are_quarantined_and_no_sample_is_in_two_splits(project, manifest, tmp_path):
    table = raw_table(project)
    relabelled = table.iloc[[20]].assign(label=(table["label"].iloc[20] + 1) % 10)
    dup = pd.concat([table, table.iloc[[10]], relabelled])
    save_raw(project, dup.reset_index(drop=True))
    stage(project, "validate", check=True)
    q = pd.read_csv(project / "reports/validation/quarantine.csv")
    assert "exact duplicate of row 10" in set(q["reason"])
    conflict = q[q["reason"] == "same content as another row but a different label"]
    assert len(conflict) == 2  # both copies: neither label can be trusted
    ids = [
        pd.read_parquet(project / f"data/prepared/{s}.parquet")["sample_id"]
        for s in ("train", "val", "test")
    ]
    assert pd.concat(ids).is_unique
    # The gate itself refuses one sample in two splits.
    from pipeline.validation.suite import run_suites

    split_table = table.head(400).copy()
    split_table.insert(2, "split", ["train", "val", "test", "train"] * 100)
    twice = pd.concat([split_table, split_table.iloc[[0]].assign(split="test")])
    result = run_suites(twice.reset_index(drop=True), manifest, 1, tmp_path)
    assert any("expect_column_values_to_be_unique" in f for f in result.failures)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
        ({"train": {"max_epochs": "many"}}, "train.max_epochs: Input should be a valid integer"),
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer: 'rmsprop' is not allowed"),
        ({"model": {"name": "vgg16"}}, "model.name: 'vgg16' is not allowed"),
        ({"validate": {"split": {"train": 0.8}}}, "validate.split: train + val + test must sum"),
    ],
)
def test_10_bad_params_stop_the_stage_before_any_output(project, change, message):
    edit_params(project, change)
    # Every stage checks the whole file first; one bad key is enough to show it for all.
    names = list(STAGE_OUTPUTS) if "learning_rate" in message else ["ingest"]
    for name in names:
        fails(stage(project, name), f"params.yaml: {message}")
        assert not (project / STAGE_OUTPUTS[name]).exists(), name


# --- Faults: one small pipeline, run once, then broken in turn ---------------------------


@pytest.fixture(scope="module")
def pipeline_project(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("hardening"))
    edit_params(project, {**TINY, "tune": {"n_trials": 0}})
    run(["dvc", "repro"], project)
    return project


@contextlib.contextmanager
def params_restored(project: Path):
    """Change params.yaml inside the block; the module's project gets it back after."""
    saved = (project / "params.yaml").read_text()
    try:
        yield
    finally:
        (project / "params.yaml").write_text(saved)


KILL_BEFORE_PUBLISH = """
import os, runpy, signal, sys
from pipeline import io
target = os.path.abspath(sys.argv[1])
real_replace, real_exchange = os.replace, io.exchange
def publishing(path):
    if os.path.abspath(path) == target:  # the outputs are written: die before publishing
        os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst, *args, **kwargs):
    publishing(dst)
    return real_replace(src, dst, *args, **kwargs)
def exchange(a, b):
    publishing(b)
    return real_exchange(a, b)
os.replace, io.exchange = replace, exchange
sys.argv = [sys.argv[2]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

# Outputs that are bit-identical run to run (run ids and PNG metadata differ legitimately).
DETERMINISTIC = {
    "ingest": ["data/raw"],
    "validate": ["data/prepared"],
    "tune": ["reports/tune/best_params.json"],
    "train": ["models/model.pt", "models/model.json"],
    "evaluate": ["reports/evaluate/metrics.json", "reports/evaluate/predictions.csv"],
    "register": ["reports/register.json"],
}


@pytest.mark.parametrize("name", list(STAGE_OUTPUTS))
def test_12_sigkill_while_publishing_leaves_no_partial_output(pipeline_project, name):
    project = pipeline_project
    output = project / STAGE_OUTPUTS[name]
    if name == "register":  # its record says what changed since the last registration,
        for _ in range(2):  # so compare runs that follow a registration of the same model
            stage(project, name, check=True)
    before = {p: dvc_hash(project / p) for p in DETERMINISTIC[name]}
    lock = (project / "dvc.lock").read_bytes()
    killed = run(
        [sys.executable, "-c", KILL_BEFORE_PUBLISH, str(output), f"pipeline.stages.{name}"],
        project,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    # Where the next stage reads there is the previous complete output or nothing, never a
    # half-written one; the temporary copy is hidden beside it.
    for p, digest in before.items():
        assert not (project / p).exists() or dvc_hash(project / p) == digest, p
    assert list(output.parent.glob(f".{output.name}.*.tmp"))
    assert (project / "dvc.lock").read_bytes() == lock
    stage(project, name, check=True)  # re-running gives what an uninterrupted run gave
    assert {p: dvc_hash(project / p) for p in DETERMINISTIC[name]} == before
    assert not list(output.parent.glob(f".{output.name}.*"))  # leftovers cleaned up


def _lock_entries(project: Path, names: list[str]) -> dict:
    import yaml

    return {n: yaml.safe_load((project / "dvc.lock").read_text())["stages"][n] for n in names}


def test_13_16_a_stage_failing_mid_way_stops_the_pipeline_and_repro_resumes(pipeline_project):
    project = pipeline_project
    run(["dvc", "repro"], project)  # consistent with dvc.lock after the kills above
    downstream = ["train", "evaluate", "register"]
    locked = _lock_entries(project, downstream)
    model_before = dvc_hash(project / "models")
    with params_restored(project):
        edit_params(project, {"train": {"lr": 1e6, "optimizer": "sgd"}})
        result = run(["dvc", "repro"], project, check=False)
        assert result.returncode != 0
        assert "[train] error: training diverged: train/loss is" in result.stderr
        assert "lower the learning rate" in result.stderr
        assert "Running stage 'evaluate'" not in result.stdout  # downstream did not run
        assert _lock_entries(project, downstream) == locked
        # The failed run left the previous model in place, byte for byte.
        assert dvc_hash(project / "models") == model_before
        failed = mlflow_runs(project)[0]
        assert failed.data.tags["stage"] == "train" and failed.info.status == "FAILED"
    resumed = run(["dvc", "repro"], project)
    assert "Stage 'ingest' didn't change" in resumed.stdout
    # The previous model never left: with the old params nothing needs to run again.
    assert "Stage 'train' didn't change" in resumed.stdout
    entry = _lock_entries(project, ["train"])["train"]
    assert (entry["params"], entry["deps"]) == (locked["train"]["params"], locked["train"]["deps"])
    assert (project / "models/model.pt").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout


def test_16_diverging_trials_fail_and_the_study_goes_on(pipeline_project):
    project = pipeline_project
    space = {"lr": [0.05, 1000000.0], "optimizer": ["sgd"], "batch_size": [64]}
    tune = {"n_trials": 4, "epochs": 2, "sampler": "random", "pruner": "none"}
    with params_restored(project):
        edit_params(project, {"tune": {**tune, "search_space": space}})
        result = stage(project, "tune", check=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[tune] trial")]
    states = [line.split()[3] for line in lines]
    assert len(states) == 4 and "FAIL" in states and "COMPLETE" in states, lines
    counts = f"'complete': {states.count('COMPLETE')}, 'pruned': 0, 'fail': {states.count('FAIL')}"
    assert f"trials {{{counts}}}" in result.stdout


def test_a_device_this_machine_lacks_stops_every_training_stage_in_one_line(pipeline_project):
    # A params.yaml written for another machine: `mps` (Apple silicon), which Linux never has.
    project = pipeline_project
    # The stages' outputs, and the checkpoints a run would resume from (if any are left).
    outputs = ["models", "reports/tune", "reports/evaluate", "reports/register.json"]
    outputs += [".runway/train"] if (project / ".runway/train").exists() else []
    before = {path: dvc_hash(project / path) for path in outputs}
    runs = len(mlflow_runs(project))
    with params_restored(project):
        # Two tune workers: the stage starts the second before it checks the device.
        tune = {"n_trials": 2, "workers": 2}
        edit_params(project, {"train": {"accelerator": "mps"}, "tune": tune})
        worker = [sys.executable, "-m", "pipeline.stages.tune", "--join"]  # runway tune-worker
        for name, result in [
            *((name, stage(project, name)) for name in ("tune", "train", "evaluate", "register")),
            ("tune", run(worker, project, check=False)),
        ]:
            line = fails(result)
            assert line == (
                f"[{name}] error: params.yaml: train.accelerator: 'mps' needs an MPS device, "
                "and this machine has none (torch.backends.mps.is_available() is False); use "
                "auto (a GPU where there is one, else the CPU) or cpu"
            )
            assert result.stderr.splitlines() == [line]  # the tune worker said nothing
    assert {path: dvc_hash(project / path) for path in outputs} == before
    assert len(mlflow_runs(project)) == runs  # no run started, not even a failed one
    assert (project / ".runway/train").exists() == (".runway/train" in outputs)


def _start(project: Path, name: str, wait_for: str) -> subprocess.Popen:
    """Start a stage and return once its output has a line containing ``wait_for``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"pipeline.stages.{name}"],
        cwd=project,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if wait_for in line:
            return proc
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{name} ended before {wait_for!r}:\n{''.join(seen)}")


def test_14_sigterm_during_training_saves_a_checkpoint_and_resumes(pipeline_project):
    project = pipeline_project
    with params_restored(project):
        edit_params(project, {"train": {"max_epochs": 12, "patience": 12}})
        proc = _start(project, "train", "[train] epoch 3/12")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 143, rest
        assert "saved to .runway/train/last.ckpt; run the stage again to resume" in rest
        assert (project / ".runway/train/last.ckpt").is_file()
        killed = mlflow_runs(project)[0]
        assert killed.info.status == "KILLED"

        resumed = stage(project, "train", check=True)
        assert "resuming the interrupted run from .runway/train/last.ckpt" in resumed.stdout
        epochs = [
            int(line.split()[2].split("/")[0])
            for line in resumed.stdout.splitlines()
            if line.startswith("[train] epoch")
        ]
        assert epochs[0] >= 3 and epochs[-1] == 12  # continued, not restarted
        finished = mlflow_runs(project)[0]
        assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
        assert not (project / ".runway/train").exists()

        edit_params(project, {"train": {"resume": "must"}})
        fails(stage(project, "train"), "train.resume is 'must' but .runway/train/last.ckpt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_15_20_corrupt_or_malicious_checkpoints_are_refused_by_name(pipeline_project, tmp_path):
    import torch

    from pipeline.config import load_params
    from pipeline.stages.train import RESUME_DIR, merged_params, resume_key

    project = pipeline_project
    cwd = os.getcwd()
    os.chdir(project)
    try:
        key = resume_key(*merged_params(load_params()))
    finally:
        os.chdir(cwd)
    state_dir = project / RESUME_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps({"key": key, "run_id": "x"}))
    last = state_dir / "last.ckpt"
    with params_restored(project):
        edit_params(project, {"train": {"resume": "must"}})
        last.write_bytes((project / "models/model.pt").read_bytes()[:4096])  # a truncated file
        fails(stage(project, "train"), ".runway/train/last.ckpt: cannot resume from this")
        marker = tmp_path / "pwned"
        torch.save({"epoch": 1, "state_dict": _Payload(marker)}, last)
        line = fails(stage(project, "train"), ".runway/train/last.ckpt: cannot resume")
        assert "refused: it needs pickle to load" in line and "posix.system" in line
        assert not marker.exists()
    shutil.rmtree(state_dir)
    weights = project / "models/model.pt"
    good = weights.read_bytes()
    try:
        weights.write_bytes(good[: len(good) // 2])
        fails(stage(project, "evaluate"), "models/model.pt: cannot load the model weights")
        torch.save({"0.low": _Payload(tmp_path / "pwned2")}, weights)
        line = fails(stage(project, "evaluate"), "models/model.pt: cannot load the model weights")
        assert "refused: it needs pickle to load" in line
        assert not (tmp_path / "pwned2").exists()
    finally:
        weights.write_bytes(good)


def test_17_sigkill_mid_study_resumes_the_same_study(pipeline_project):
    project = pipeline_project
    with params_restored(project):
        # Trials of several seconds: trial 2 is still running a second after trial 1 ends.
        edit_params(project, {"tune": {"n_trials": 3, "epochs": 20, "pruner": "none"}})
        proc = _start(project, "tune", "[tune] trial 1:")
        time.sleep(1.0)  # trial 2 is under way
        proc.kill()  # SIGKILL: trial 2 stays RUNNING in the study
        proc.communicate(timeout=60)
        result = stage(project, "tune", check=True)
    assert "2 trial(s) already done, 1 interrupted trial(s) marked failed; running 1 more" in (
        result.stdout
    )
    assert "trials {'complete': 3, 'pruned': 0, 'fail': 1}" in result.stdout


# --- Security ---------------------------------------------------------------------------


def test_22_credentials_are_masked_before_logging(mlflow_store):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    experiment = tracking.setup("secrets")
    tags = {"stage": "x", "source": "https://alice:s3cr3t@example.com/data.csv"}
    with tracking.run(experiment, "x", tags) as active:
        tracking.log_params(
            {
                "data.path": "postgresql://bob:hunter2@db:5432/runs",
                "api_token": "tok-123",
                "db.password": "hunter2",
                "url": "https://host/x?sig=abc&X-Amz-Security-Token=zzz&page=2",
                "header": "Bearer abc.def.ghi",
                "lr": 0.01,
            }
        )
    run_ = MlflowClient().get_run(active.info.run_id)
    logged = json.dumps({**run_.data.params, **run_.data.tags})
    for secret in ("s3cr3t", "hunter2", "tok-123", "abc.def.ghi", "zzz", "sig=abc"):
        assert secret not in logged, secret
    assert run_.data.params["data.path"] == "postgresql://bob:***@db:5432/runs"
    assert run_.data.params["url"] == "https://host/x?sig=***&X-Amz-Security-Token=***&page=2"
    assert run_.data.params["lr"] == "0.01"
    assert run_.data.tags["source"] == "https://alice:***@example.com/data.csv"
