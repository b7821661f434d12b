"""`runway retrain` as CI runs it: a bare git origin, a local directory as DVC remote, a first
clone that runs the pipeline and pushes, and a fresh clone (the runner) that retrains."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import IRIS, copy_project, edit_params, run
from tests.formats import write_iris_csv

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("retrain")]

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """(origin, remote, store URI, first clone) after the first clone ran and pushed."""
    root = tmp_path_factory.mktemp("team")
    origin, remote = root / "origin.git", root / "remote"
    run(["git", "init", "-q", "--bare", str(origin)], root)
    first = copy_project(root / "first")
    write_iris_csv(first / "data/external/iris.csv")
    edit_params(first, IRIS)
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/shared.db"}  # the team's store
    run(["dvc", "remote", "add", "-d", "local", str(remote)], first)
    run(["dvc", "add", "data/external/iris.csv"], first)  # the runner pulls it
    run(["dvc", "repro"], first, env=store)
    run(["dvc", "push"], first)
    run(["git", "add", "-A"], first)
    run([*GIT, "commit", "-qm", "first run"], first)
    run(["git", "push", "-q", str(origin), "HEAD:main"], first)
    return origin, remote, store, first


def own_store(team, tmp_path: Path) -> dict[str, str]:
    """A copy of the team's store for a test that registers models (artifacts stay where
    the first clone logged them): no test sees another's champion."""
    shared = Path(team[2]["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    copy = tmp_path / "team.db"
    shutil.copyfile(shared, copy)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{copy}"}


def pulled_runner(team, tmp_path: Path):
    """(runner, store env, MLflow client): a fresh clone with the data pulled, on its own
    copy of the team's store."""
    import mlflow

    store = own_store(team, tmp_path)
    runner = clone(team[0], tmp_path / "runner")
    run(["dvc", "pull"], runner)
    return runner, store, mlflow.MlflowClient(store["MLFLOW_TRACKING_URI"])


def clone(origin: Path, where: Path) -> Path:
    run(["git", "clone", "-q", "-b", "main", str(origin), str(where)], origin.parent)
    return where


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def test_a_fresh_runner_pulls_and_finds_nothing_to_retrain(team, tmp_path):
    origin, _, store, _ = team
    runner = clone(origin, tmp_path / "runner")
    result = run(["runway", "retrain"], runner, env={**store, "CI": "true"})
    assert result.stdout.splitlines()[-1] == (
        "[retrain] nothing to retrain: dvc.lock matches the data, params and code"
    )
    assert "[retrain] dvc pull from remote 'local'" in result.stdout
    assert (runner / "models/model.pt").is_file()  # pulled from the remote
    assert stages_run(result.stdout) == [] and not (runner / "reports/retrain.md").exists()


def test_a_params_change_reruns_only_its_stages_reports_and_pushes(team, tmp_path):
    origin, remote, _, _ = team
    store = own_store(team, tmp_path)
    runner = clone(origin, tmp_path / "runner")
    edit_params(runner, {"train": {"max_epochs": 2}})
    objects_before = {p for p in remote.rglob("*") if p.is_file()}
    result = run(["runway", "retrain"], runner, env={**store, "CI": "true"})
    assert stages_run(result.stdout) == ["train", "evaluate", "register"]
    assert "[retrain] changed: params train.max_epochs" in result.stdout
    report = (runner / "reports/retrain.md").read_text()
    assert report.startswith("<!-- runway-retrain -->\n## Runway retrain\n")
    assert "iris version 2:" in report
    assert "train.max_epochs" in report  # dvc params diff
    assert "| train | " in report and "| total | " in report
    trials = report.split("### Tuning\n\n", 1)[1].splitlines()
    assert re.fullmatch(r"- 2 trials: \d complete, \d pruned, 0 fail", trials[0])
    assert trials[1].startswith("- best val/loss ")
    assert "- model `models:/iris/2`" in report
    page = (runner / "reports/retrain.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "http" not in page
    assert {p for p in remote.rglob("*") if p.is_file()} > objects_before  # pushed


def lock_md5(project: Path, path: str, rev: str | None = None) -> str:
    import yaml

    text = (
        run(["git", "show", f"{rev}:dvc.lock"], project).stdout
        if rev
        else (project / "dvc.lock").read_text()
    )
    stages = yaml.safe_load(text)["stages"]
    return next(e["md5"] for s in stages.values() for e in s.get("deps", []) if e["path"] == path)


def test_new_data_reruns_from_ingest_shows_its_drift_and_promotes_only_if_better(team, tmp_path):
    import pandas as pd

    runner, store, client = pulled_runner(team, tmp_path)
    champion = client.get_model_version_by_alias("iris", "champion")
    source = runner / "data/external/iris.csv"
    table = pd.read_csv(source)
    more = table[table["species"] == "versicolor"].head(40).copy()
    more["sepal_width"] += 0.05  # new measurements, so new samples
    pd.concat([table, more]).to_csv(source, index=False)
    run(["dvc", "add", "data/external/iris.csv"], runner)
    run([*GIT, "commit", "-qam", "40 more versicolor"], runner)

    result = run(["runway", "retrain"], runner, env={**store, "CI": "true"})
    assert stages_run(result.stdout) == [
        "ingest", "validate", "tune", "train", "evaluate", "register"
    ]  # fmt: skip
    report = (runner / "reports/retrain.md").read_text()
    before, after = lock_md5(runner, "data/external", "HEAD"), lock_md5(runner, "data/external")
    assert before != after
    assert f"| `data/external` | `{before[:12]}` | `{after[:12]}` (changed) |" in report
    data = report.split("### Data\n\n", 1)[1].split("###", 1)[0]
    assert "- rows in: 190, quarantined: 1, kept: 189" in data, data  # iris repeats a row
    assert "- quarantined by reason: 1 × exact duplicate\n" in data
    assert "- Great Expectations: passed (" in report
    drift = report.split("### Drift\n\n", 1)[1].split("###", 1)[0]
    assert f"data champion v{champion.version} was trained on" in drift
    rows = re.findall(r"^\| (\w+) \| ([\d.]+)% \| ([\d.]+)% \| (\*\*drift\*\*)? \|$", drift, re.M)
    shares = {name: (float(old), float(new), bool(flag)) for name, old, new, flag in rows}
    assert set(shares) == {"setosa", "versicolor", "virginica"}
    for old, new, flag in shares.values():
        assert flag is (abs(new - old) > 5)  # retrain.drift_class_share: 0.05
    old, new, flagged = shares["versicolor"]
    assert new > old + 5 and flagged
    moved = sum(flag for *_, flag in shares.values())
    assert f"- class balance: {moved} of 3 classes moved by more than 5 points" in drift
    record = json.loads((runner / "reports/register.json").read_text())
    comparison = record["comparison"]
    better = comparison["challenger"] > comparison["champion"] + comparison["min_delta"]
    assert record["promoted"] is better
    now = client.get_model_version_by_alias("iris", "champion").version
    assert now == (record["version"] if better else champion.version)
    decision = "promoted to champion" if better else "champion unchanged"
    assert f"**iris version {record['version']}: {decision}** — {record['reason']}" in report


def test_an_unreachable_remote_is_named(team, tmp_path):
    origin, _, store, _ = team
    runner = clone(origin, tmp_path / "runner")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "gone")], runner)
    result = run(["runway", "retrain"], runner, check=False, env=store)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        f"[retrain] error: dvc pull from remote 'local' ({tmp_path / 'gone'}) failed: "
    )


def test_bad_new_data_stops_at_the_gate_keeps_the_champion_and_pushes_nothing(team, tmp_path):
    import pandas as pd

    remote = team[1]
    runner, store, client = pulled_runner(team, tmp_path)
    champion = client.get_model_version_by_alias("iris", "champion").version
    source = runner / "data/external/iris.csv"
    table = pd.read_csv(source)
    rare = table[table["species"] == "virginica"].head(3)
    pd.concat([table[table["species"] != "virginica"], rare]).to_csv(source, index=False)
    run(["dvc", "add", "data/external/iris.csv"], runner)
    run([*GIT, "commit", "-qam", "new data"], runner)
    objects_before = {p for p in remote.rglob("*") if p.is_file()}
    result = run(["runway", "retrain"], runner, check=False, env={**store, "CI": "true"})
    assert result.returncode == 1
    assert "[retrain] changed: data/external changed" in result.stdout.splitlines()
    assert len(result.stderr.splitlines()) == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("[retrain] error: stage validate failed: ")
    assert "class 'virginica' has 3 samples, fewer than validate.min_per_class=5" in line
    report = (runner / "reports/retrain.md").read_text()
    assert "**Failed in stage `validate`**" in report
    assert "class 'virginica' has 3 samples" in report
    assert "- Great Expectations: FAILED (" in report
    assert "  - failed: class 'virginica' has 3 samples, fewer than" in report
    assert "Data Docs `.runway/validation-failed/data_docs/index.html`" in report
    # the drift section reads the new table ingest wrote: virginica all but gone
    assert re.search(r"^\| virginica \| 3\d\.\d% \| \d\.\d% \| \*\*drift\*\* \|$", report, re.M)
    assert client.get_model_version_by_alias("iris", "champion").version == champion
    assert {p for p in remote.rglob("*") if p.is_file()} == objects_before  # nothing pushed


def test_a_set_override_and_the_html_report_with_its_plots(team, tmp_path):
    """Opened in Debian's chromium with every outside request refused."""
    from tests.ui import chromium

    origin, _, _, _ = team
    store = own_store(team, tmp_path)
    runner = clone(origin, tmp_path / "runner")
    result = run(["runway", "retrain", "--set", "train.patience=1"], runner, env=store)
    # dvc exp run writes the value to params.yaml: the params check runs first
    assert stages_run(result.stdout) == ["params", "train", "evaluate", "register"]
    report = (runner / "reports/retrain.md").read_text()
    assert "- --set train.patience=1" in report
    assert re.search(r"\| params\.yaml +\| train\.patience +\| 2 +\| 1 +\|", report)
    assert "- class balance: 0 of 3 classes moved by more than 5 points" in report
    assert "- features: 0 of 4 moved" in report  # the champion's own training data
    page_file = runner / "reports/retrain.html"
    with chromium() as browser:
        page = browser.new_page()
        outside: list[str] = []
        page.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith(("file:", "data:"))
                else (outside.append(route.request.url), route.abort())
            ),
        )
        page.goto(page_file.as_uri())
        table = page.locator("table").filter(has_text="test/accuracy")
        assert table.count() == 1 and table.is_visible()
        header = [h.strip() for h in table.locator("th").all_inner_texts()]
        assert header[:2] == ["Path", "Metric"]
        for name in ("confusion_matrix", "per_class", "retrain_curves"):
            image = page.locator(f'img[alt="{name}"]')
            assert image.evaluate("img => img.complete && img.naturalWidth") > 100, name
        assert page.get_by_text("Runway retrain", exact=True).is_visible()
        assert outside == []


def test_remote_add_makes_a_local_folder_the_default_remote(tmp_path):
    project = copy_project(tmp_path / "p")
    result = run(["runway", "remote", "add", "../store"], project)
    folder = (tmp_path / "store").resolve()
    assert result.stdout == f"[remote] 'local' ({folder}) is the default DVC remote (.dvc/config)\n"
    assert folder.is_dir()
    assert run(["dvc", "remote", "default"], project).stdout.strip() == "local"
    assert run(["dvc", "config", "remote.local.url"], project).stdout.strip() == str(folder)
    (tmp_path / "file").write_text("")
    failed = run(["runway", "remote", "add", str(tmp_path / "file" / "x")], project, check=False)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"[remote] error: cannot make the remote folder {tmp_path}")
