"""What a person sees in the MLflow UI, checked in a real browser (Debian's chromium driven by
Playwright; nothing is downloaded).

One project for the module: a study of five short trials (the median pruner stops some), then
two trainings without tuning that differ in ``train.lr`` alone. `runway ui` serves the store;
the browser opens the experiment link it prints, expands the study, selects the two trainings
and compares them, the way a person would.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import copy_project, edit_params, run
from tests.ui import UiProcess, chromium

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser")]

WAIT_MS = 30_000  # the UI's first page load on a busy 2-core machine
# Five trials of four epochs: TPE's seeded draws make trials 3 and 4 worse than the median
# of the first three at epoch 3, so the median pruner stops them.
TUNING = {"n_trials": 5, "epochs": 4, "pruner": "median", "sampler": "tpe", "seed": 42}
SHORT = {"max_epochs": 3, "patience": 2}
CHANGED = ("train", "lr", 0.003, 0.005)  # used by train, not searched (tune.n_trials: 0)
# One torch thread per stage: the suite runs two test workers on two cores, where a stage's
# two threads wait on each other whenever the other worker holds a core.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
HEADLINE = ("test/accuracy", "test/f1_macro", "test/precision_macro", "test/recall_macro")


def flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """metrics.json's numbers under their MLflow names (``test/accuracy``), whether the file
    nests them by split or names them flat."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}/")
        else:
            out[f"{prefix}{key}"] = value
    return out


def shown(value: float) -> str:
    """A metric as the MLflow UI prints it (``Utils.formatMetric``): three decimals below
    10, JavaScript's rounding, no trailing zeros."""
    if value == 0:
        return "0"
    assert 0.001 <= abs(value) < 10, value  # the range this project's headline metrics live in
    return f"{math.floor(value * 1000 + 0.5) / 1000:g}"


@dataclass
class Training:
    run_id: str
    lr: float
    metrics: dict[str, float]


@dataclass
class Project:
    root: Path
    trainings: list[Training] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)  # MLflow names of pruned trial runs
    finished: str = ""  # the validate run's name: FINISHED, a known status icon


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root = copy_project(tmp_path_factory.mktemp("browser") / "project")
    edit_params(root, {"tune": TUNING, "train": SHORT})
    run(["dvc", "repro", "tune"], root, env=ONE_THREAD)
    project = Project(root)

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("runway-digits").experiment_id
    pruned = client.search_runs([experiment], "tags.`optuna.trial_state` = 'PRUNED'")
    assert pruned, "no pruned trial: the browser test needs one"
    assert {r.info.status for r in pruned} == {"FINISHED"}
    project.pruned = sorted(r.info.run_name for r in pruned)
    # The same trials, by number, are the ones Optuna's study holds as pruned.
    import optuna

    storage = f"sqlite:///{root}/mlruns/optuna.db"
    (study,) = optuna.study.get_all_study_names(storage)
    trials = optuna.load_study(study_name=study, storage=storage).trials
    states = optuna.trial.TrialState
    assert project.pruned == sorted(
        f"{study} · trial {t.number} · PRUNED" for t in trials if t.state == states.PRUNED
    )
    validate = client.search_runs([experiment], "tags.stage = 'validate'")
    assert [r.info.status for r in validate] == ["FINISHED"]
    project.finished = validate[0].info.run_name

    section, key, before, after = CHANGED
    edit_params(root, {"tune": {"n_trials": 0}})
    for value in (before, after):
        edit_params(root, {section: {key: value}})
        run(["dvc", "repro", "evaluate"], root, env=ONE_THREAD)  # no registered version needed
        record = json.loads((root / "models" / "run.json").read_text())
        metrics = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
        project.trainings.append(Training(record["run_id"], value, flat(metrics)))
    assert len({t.run_id for t in project.trainings}) == 2
    return project


@pytest.fixture(scope="module")
def ui(project) -> Iterator[UiProcess]:
    server = UiProcess(project.root)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser):
    """A fresh page of its own (cookies, storage); see :func:`evidence` for failures."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@contextlib.contextmanager
def evidence(page, folder: Path) -> Iterator[None]:
    """On an exception: the page as the browser shows it (PNG) and its HTML, in ``folder``."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(folder / "page.png"), full_page=True)
            (folder / "page.html").write_text(page.content())
        note = f"browser evidence: {folder}/page.png, {folder}/page.html (at {page.url})"
        print(note)
        exc.add_note(note)
        raise


def seen(locator) -> None:
    """Wait until ``locator`` is visible (the UI fetches and renders as it goes)."""
    from playwright.sync_api import expect

    expect(locator).to_be_visible(timeout=WAIT_MS)


def open_runs_table(page, ui: UiProcess, project: Project):
    """The experiment link `runway ui` printed, opened: the training-runs table."""
    link = ui.link("runs")
    assert "workflowType=machine_learning" in link
    page.goto(link)
    seen(page.get_by_role("heading", name="Runs", level=2))
    table = page.get_by_role("grid")
    seen(table.get_by_role("columnheader", name="Run Name", exact=True).first)
    seen(table.get_by_role("link", name=project.finished, exact=True))
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url
    return table


def row_of(table, run_name: str):
    """The table row (its pinned left part: checkbox, name, status) of the run ``run_name``."""
    page = table.page  # an inner locator of `has=` is relative: start it at the page
    return table.get_by_role("row").filter(has=page.get_by_role("link", name=run_name, exact=True))


def status_icon(row) -> tuple[str, str]:
    """The status icon next to a run's start time: its drawing and its colour."""
    icon = row.get_by_role("gridcell").nth(2).locator("svg")
    return icon.evaluate(
        "svg => [svg.innerHTML, getComputedStyle(svg.closest('[role=img]') || svg).color]"
    )


def test_experiment_link_opens_the_runs_table_and_a_pruned_trial_is_not_failed(
    page, ui, project, tmp_path
):
    from playwright.sync_api import expect

    with evidence(page, tmp_path):
        table = open_runs_table(page, ui, project)
        # The study's trials are nested under its run: expand it.
        study = table.get_by_role("row").filter(
            has=page.get_by_role("link", name=re.compile(r"^tune · "))
        )
        study.get_by_role("gridcell").nth(1).get_by_role("button").click()
        for name in project.pruned:
            assert re.fullmatch(r".+ · trial \d+ · PRUNED", name), name
            seen(table.get_by_role("link", name=name, exact=True))
        finished = status_icon(row_of(table, project.finished))
        for name in project.pruned:
            assert status_icon(row_of(table, name)) == finished, name
        # Its own page says so in words.
        table.get_by_role("link", name=project.pruned[0], exact=True).click()
        seen(page.get_by_role("heading", name=project.pruned[0]))
        status = page.get_by_text("Status", exact=True).locator("xpath=..")
        expect(status).to_contain_text("Finished", timeout=WAIT_MS)


def compare_values(page, header: str) -> list[str]:
    """The cells of the compare view's table row headed ``header`` (one per run)."""
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=header, exact=True))
    return [text.strip() for text in row.get_by_role("cell").all_inner_texts()]


def metric_values(page, name: str) -> list[str]:
    """The values the compare view shows for metric ``name``, one per run: its names and its
    values are two scroll-synced grids, so a value belongs to the name at its height."""
    grids = page.get_by_role("grid")
    names, values = grids.nth(0), grids.nth(1)
    link = names.get_by_role("link", name=name, exact=True)
    box = grid = None
    for _ in range(20):  # scroll the values grid until the metric's line is in view
        grid = names.bounding_box()
        box = link.bounding_box() if link.count() else None
        if box and grid["y"] <= box["y"] and box["y"] + box["height"] <= grid["y"] + grid["height"]:
            break
        area = values.bounding_box()
        page.mouse.move(area["x"] + area["width"] / 2, area["y"] + area["height"] / 2)
        page.mouse.wheel(0, 45 if box is None or box["y"] > grid["y"] else -45)
        page.wait_for_timeout(100)
    else:
        raise AssertionError(f"metric {name} is not in the compare view")
    middle = box["y"] + box["height"] / 2
    cells = []
    for cell in values.get_by_role("rowgroup").locator(":scope > *").all():
        where = cell.bounding_box()
        if where and where["y"] <= middle < where["y"] + where["height"]:
            cells.append((where["x"], cell.inner_text().strip()))
    return [text for _, text in sorted(cells)]


def test_compare_two_trainings_shows_what_differs(page, ui, project, tmp_path):
    section, key, before, after = CHANGED
    param = f"{section}.{key}"
    names = {t.lr: f"train · cnn · lr {t.lr:.1e} · bs 64" for t in project.trainings}
    with evidence(page, tmp_path):
        table = open_runs_table(page, ui, project)
        for training in project.trainings:
            row = row_of(table, names[training.lr])
            row.get_by_role("checkbox", name=re.compile("toggle row selection")).check()
        page.get_by_role("button", name="Compare", exact=True).click()
        seen(page.get_by_text("Comparing 2 Runs from 1 Experiment"))
        # Columns in the order of the Run ID header row.
        seen(page.get_by_role("rowheader", name="Run Name:"))
        ids = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="Run ID:"))
        columns = [text.strip() for text in ids.get_by_role("link").all_inner_texts()]
        by_id = {t.run_id: t for t in project.trainings}
        assert sorted(columns) == sorted(by_id)
        runs = [by_id[run_id] for run_id in columns]

        shown_names = compare_values(page, "Run Name:")
        assert shown_names == [names[t.lr] for t in runs]
        assert len(set(shown_names)) == 2
        assert compare_values(page, param) == [f"{t.lr:g}" for t in runs]
        assert sorted(t.lr for t in runs) == [before, after]
        # "Show diff only" leaves the params that differ.
        params = page.get_by_role("table").filter(
            has=page.get_by_role("rowheader", name=param, exact=True)
        )
        assert len(params.get_by_role("rowheader").all()) > 10
        page.get_by_role("switch", name="Parameters - Show diff only").click()
        seen(params.get_by_role("rowheader", name=param, exact=True))
        # train.lr, and the rate it made at the training's batch (train.effective_lr).
        differing = sorted(params.get_by_role("rowheader").all_inner_texts())
        assert differing == sorted([param, "train.effective_lr"])
        for metric in HEADLINE:
            assert metric_values(page, metric) == [shown(t.metrics[metric]) for t in runs], metric
