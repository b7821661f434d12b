"""dvc.yaml says exactly what each stage depends on: the pipeline modules it imports, the
data it reads, the params keys it reads and the paths it writes.

DVC reruns a stage only when a listed dependency changed, so a missing entry means a change
that silently reruns nothing, and an extra one means reruns for nothing.
"""

from __future__ import annotations

import ast
import modulefinder
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
CHECKED = ".runway/params.ok"  # the params stage's output, a dependency of every other stage


def _paths(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def stage_module(name: str) -> Path:
    command = STAGES[name]["cmd"].split()
    assert command[:2] == ["python", "-m"], STAGES[name]["cmd"]
    return ROOT / (command[2].replace(".", "/") + ".py")


def import_closure(script: Path) -> set[str]:
    """Every module of the pipeline package the script imports, directly or not, at the top
    or inside a function (modulefinder reads the byte code, it runs nothing)."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT)])
    finder.run_script(str(script))
    found = {
        Path(module.__file__).relative_to(ROOT).as_posix()
        for name, module in finder.modules.items()
        if name.startswith("pipeline") and module.__file__
    }
    return found | {script.relative_to(ROOT).as_posix()}


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return bool(body) and not (len(body) == 1 and isinstance(body[0], ast.Expr))


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def code_deps(name: str) -> list[str]:
    return [d for d in _paths(STAGES[name]["deps"]) if d.startswith("pipeline/")]


def missing_and_extra(name: str) -> tuple[list[str], list[str]]:
    """Modules the stage imports that dvc.yaml does not list, and listed code it never
    imports. Package ``__init__.py`` files without code (at most a docstring) change
    nothing and need no entry."""
    closure = import_closure(stage_module(name))
    deps = code_deps(name)
    empty_inits = {p for p in closure if p.endswith("__init__.py") and not has_code(ROOT / p)}
    missing = sorted(p for p in closure - empty_inits if not covered(p, deps))
    extra = []
    for dep in deps:
        files = (
            [p.relative_to(ROOT).as_posix() for p in (ROOT / dep).rglob("*.py")]
            if (ROOT / dep).is_dir()
            else [dep]
        )
        extra += [f for f in files if f not in closure]
    return missing, sorted(extra)


@pytest.mark.parametrize("name", list(STAGES))
def test_code_deps_are_exactly_the_modules_the_stage_imports(name):
    missing, extra = missing_and_extra(name)
    assert missing == [], f"dvc.yaml stage {name!r} does not list modules it imports"
    assert extra == [], f"dvc.yaml stage {name!r} lists code it never imports"


def test_the_closure_check_sees_imports_inside_functions_and_indirect_ones():
    # register imports evaluate (which imports the data loader and the models); the check
    # would fail if dvc.yaml dropped any of them.
    closure = import_closure(stage_module("register"))
    assert {"pipeline/stages/evaluate.py", "pipeline/data/loader.py"} <= closure
    assert "pipeline/models/resnet.py" in closure and "pipeline/data/cifar.py" not in closure
    # Scoring needs no Lightning: neither the training code nor the LightningModule.
    assert "pipeline/training.py" not in closure and "pipeline/models/module.py" not in closure
    deps = [d for d in code_deps("register") if d != "pipeline/data/loader.py"]
    assert not covered("pipeline/data/loader.py", deps)


def test_byte_code_beside_the_code_is_no_dependency():
    # Where Python writes byte code (its default), importing the package writes
    # pipeline/models/__pycache__/*.pyc: were that part of the directory's hash, every stage
    # depending on pipeline/models would look changed after any import, differently on each
    # machine and Python version.
    def ignored(path: str) -> bool:
        return run(["dvc", "check-ignore", "-q", path], ROOT, check=False).returncode == 0

    assert ignored("pipeline/models/__pycache__/cnn.cpython-311.pyc")
    assert ignored("pipeline/__pycache__/training.cpython-312.pyc")
    assert not ignored("pipeline/models/cnn.py")


def data_paths() -> dict[str, tuple[set[str], set[str]]]:
    """Each stage's data dependencies and outputs, from the code's own constants."""
    from pipeline.config import EXTERNAL_DIR, PRETRAINED_DIR
    from pipeline.data.table import PREPARED_DIR, RAW_DIR
    from pipeline.models import MODELS_DIR
    from pipeline.stages import evaluate, params, register, tune, validate
    from pipeline.stages.train import BEST_PARAMS

    def s(*paths) -> set[str]:
        return {Path(p).as_posix() for p in paths}

    evaluated = s(
        *(
            evaluate.REPORT_DIR / f
            for f in ("per_class.json", "per_class.csv", "predictions.csv", "per_class.png")
        )
    )
    return {
        "params": (set(), s(params.CHECKED)),
        "ingest": (s(EXTERNAL_DIR), s(RAW_DIR)),
        "validate": (s(RAW_DIR), s(PREPARED_DIR, validate.REPORT_DIR)),
        "tune": (s(PREPARED_DIR, PRETRAINED_DIR), s(tune.REPORT_DIR)),
        "train": (s(PREPARED_DIR, BEST_PARAMS, PRETRAINED_DIR), s(MODELS_DIR)),
        "evaluate": (
            s(MODELS_DIR, PREPARED_DIR),
            evaluated | s(evaluate.METRICS, evaluate.REPORT_DIR / "confusion_matrix.png"),
        ),
        "register": (
            s(MODELS_DIR / "run.json", evaluate.METRICS, PREPARED_DIR / "test.parquet"),
            s(register.REPORT),
        ),
    }


@pytest.mark.parametrize("name", list(STAGES))
def test_data_deps_and_outputs_match_the_code(name):
    entry = STAGES[name]
    deps = {d for d in _paths(entry["deps"]) if not d.startswith("pipeline/")}
    outs = set(_paths(entry.get("outs", []) + entry.get("metrics", [])))
    expected_deps, expected_outs = data_paths()[name]
    if name != "params":
        expected_deps = expected_deps | {CHECKED}
    assert (deps, outs) == (expected_deps, expected_outs)


def test_every_stage_follows_the_params_check_and_keeps_its_outputs_on_failure():
    assert CHECKED in _paths(STAGES["params"]["outs"])
    assert set(STAGES["params"]["params"]) == set(
        yaml.safe_load((ROOT / "params.yaml").read_text())
    )
    for name, entry in STAGES.items():
        if name != "params":
            assert CHECKED in entry["deps"], name
        for out in entry.get("outs", []) + entry.get("metrics", []):
            assert isinstance(out, dict) and next(iter(out.values())).get("persist"), (name, out)


def listed_params(name: str) -> list[str]:
    return [next(iter(p)) if isinstance(p, dict) else p for p in STAGES[name].get("params", [])]


# Read by a stage but deliberately not a dependency: how to restart, not what is computed.
NOT_DEPENDENCIES = {"train": {"train.resume"}}


def unlisted_reads(name: str, reads: set[str]) -> list[str]:
    """Params keys the stage read that its dvc.yaml entry does not cover (a listed key
    covers everything below it: ``model`` covers ``model.channels``)."""
    listed = listed_params(name)
    ignored = NOT_DEPENDENCIES.get(name, set())
    return sorted(
        key
        for key in reads - ignored
        if not any(key == p or key.startswith(p + ".") for p in listed)
    )


def test_unlisted_reads_are_found():
    assert unlisted_reads("evaluate", {"evaluate.batch_size", "train.lr"}) == ["train.lr"]
    assert unlisted_reads("train", {"model.channels", "train.resume"}) == []


def test_a_section_read_records_the_keys_read(monkeypatch, tmp_path):
    from pipeline import config

    monkeypatch.setenv(config.READS_ENV, str(tmp_path))
    monkeypatch.setattr(config, "_reads", None)
    params = config.load_params()
    _ = params.train.lr
    params.tune.model_dump(exclude={"n_trials", "search_space"})
    hp, model = config.with_tuned(
        params.train, params.model, {"train.lr": 0.1, "model.channels": 8}
    )
    _ = hp.lr, hp.seed, model.channels, model.dropout
    _ = hp.model_copy(update={"max_epochs": 3}).max_epochs
    assert config.params_read() == {
        "train.lr",
        "train.seed",
        "model.dropout",
        *(f"tune.{k}" for k in ("metric", "epochs", "seed", "sampler", "pruner", "storage")),
        "tune.val_check_interval",
        "tune.workers",
        "tune.train_samples",
        "tune.val_samples",
    }
