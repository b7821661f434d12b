"""Reports a person opens with no network: the validation summary page and DVC's plots.

One project copy validates iris from a CSV (`dvc repro validate`); a second CSV with a class
of three samples, whose name is HTML, then fails the gate. DVC's plots are drawn from the files
dvc.yaml's `plots:` names (stand-ins in their real formats: training is not needed to check
how DVC renders them), committed twice so that `dvc plots diff HEAD~1` has a revision to show.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import copy_project, edit_params, run
from tests.formats import write_black_png, write_iris_csv
from tests.ui import chromium

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("offline_reports")]

RARE = "<i>rare</i>"  # a class name that is also HTML: the page must show it as text
N_EXPECTATIONS = 15  # 1 columns, 6 samples, 3 features (a CSV has no value range), 5 class_counts
PLOTS = {
    "reports/evaluate/confusion_matrix.png": "static/{rev}_reports_evaluate_confusion_matrix.png",
    "reports/evaluate/per_class.png": "static/{rev}_reports_evaluate_per_class.png",
    "reports/tune/intermediate_values.png": "static/{rev}_reports_tune_intermediate_values.png",
    "reports/tune/optimization_history.png": "static/{rev}_reports_tune_optimization_history.png",
}
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], project)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("offline") / "project")
    write_iris_csv(project / "data/external/iris.csv")
    edit_params(
        project,
        {
            "data": {"source": "csv", "path": "data/external/iris.csv", "label_column": "species"},
            "model": {"name": "mlp"},
        },
    )
    result = run(["dvc", "repro", "validate"], project)
    for i, path in enumerate(PLOTS):
        write_black_png(project / path, 40 + i, 30)
    test = pd.read_parquet(project / "data/prepared/test.parquet", columns=["sample_id", "label"])
    test.rename(columns={"label": "actual"}).assign(predicted=test["label"]).to_csv(
        project / "reports/evaluate/predictions.csv", index=False
    )
    run(["git", "add", "-f", *PLOTS], project)  # reports/tune/ is git-ignored (a DVC output)
    commit(project, "first run")
    (project / "notes.txt").write_text("a commit that changes no output\n")
    commit(project, "notes")
    return project, result


@pytest.fixture(scope="module")
def failed(project):
    """The gate failing on a real table: three irises renamed to a class of their own."""
    project, _ = project
    source = project / "data/external/iris.csv"
    good = source.read_text()
    table = pd.read_csv(source)
    table.loc[table.index[-3:], "species"] = RARE
    table.to_csv(source, index=False)
    try:
        result = run(["dvc", "repro", "validate"], project, check=False)
    finally:
        source.write_text(good)
    return project / ".runway/validation-failed", result


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def offline_page(browser, url: str):
    """``url`` opened with every request off this machine refused; returns the page and the
    list of URLs it tried to fetch from elsewhere."""
    context = browser.new_context()
    asked: list[str] = []

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            asked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.goto(url, wait_until="load")
    return context, page, asked


def gx_expectations(report: Path) -> list[tuple[str, str, str | None, bool]]:
    """(suite, type, column, success) of every expectation in GX's result JSON."""
    return [
        (
            v["suite_name"],
            r["expectation_config"]["type"],
            r["expectation_config"]["kwargs"].get("column"),
            r["success"],
        )
        for v in json.loads((report / "gx_results.json").read_text())
        for r in v["results"]
    ]


def expectation_rows(html: str) -> list[tuple[str, str, str, str]]:
    """(result, suite, type, column) of each row of the page's expectation table."""
    body = html.split('<table id="expectation-table">', 1)[1].split("</table>", 1)[0]
    cells = re.compile(
        r'<tr class="(passed|failed)"><td class="status">[^<]*</td><td>([^<]*)</td>'
        r"<td><code>([^<]*)</code></td><td>([^<]*)</td>"
    )
    return cells.findall(body)


def assert_self_contained(html: str) -> None:
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert not EXTERNAL.findall(html)
    assert "url(" not in html  # no font or image pulled in by the CSS


def test_validate_writes_a_summary_page_of_every_expectation(project):
    project, result = project
    report = project / "reports/validation"
    assert "[validate] report: reports/validation/summary.html\n" in result.stdout
    html = (report / "summary.html").read_text()
    assert_self_contained(html)
    expected = gx_expectations(report)
    assert len(expected) == N_EXPECTATIONS and all(success for *_, success in expected)
    rows = expectation_rows(html)
    assert sorted(rows) == sorted(
        ("passed", suite, type_, column or "(table)") for suite, type_, column, _ in expected
    )
    assert (
        f'<span class="verdict pass">PASSED</span> {N_EXPECTATIONS} of {N_EXPECTATIONS} '
        "expectations met</p>"
    ) in html
    assert "<dt>Rows in</dt><dd>150</dd>" in html  # iris has one row twice
    assert "<dt>Rows quarantined</dt><dd>1</dd>" in html
    assert "<dt>Prepared rows</dt><dd>149 (train " in html
    assert (
        '<tr class="passed"><td class="status">passed</td><td>at most '
        "validate.max_quarantine_frac=0.05 of the rows quarantined</td><td>1 of 150 (0.7%)</td>"
    ) in html
    assert '<tr><td class="num">1</td><td>exact duplicate of row 101</td></tr>' in html
    # one passing row per class, under the class's name
    for name in ("setosa", "versicolor", "virginica"):
        assert re.search(
            rf'<tr class="passed"><td class="status">passed</td>.*<td>{name}</td>', html
        )
    # GX's Data Docs are still written beside it
    assert (report / "data_docs/index.html").is_file()


def test_a_failed_gate_writes_its_summary_page_failed_checks_first(failed):
    report, result = failed
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("[validate] error")]
    (line,) = errors
    assert line.endswith(
        "the previous outputs are unchanged (report: .runway/validation-failed/summary.html, "
        "Data Docs: .runway/validation-failed/data_docs/index.html)"
    ), line
    assert "[validate] report: .runway/validation-failed/summary.html\n" in result.stdout
    problems = [
        f"class {RARE!r} has 3 samples, fewer than validate.min_per_class=20",
        f"class {RARE!r} has no sample in the test split",
    ]
    assert json.loads((report / "summary.json").read_text())["failures"] == problems
    html = (report / "summary.html").read_text()
    assert_self_contained(html)
    assert RARE not in html  # escaped everywhere
    failures = html.split('<ul class="failures">', 1)[1].split("</ul>", 1)[0]
    assert re.findall(r"<li>(.*?)</li>", failures) == [escape(p) for p in problems]
    # GX's two failed expectations head the table, then the 13 that passed
    expected = gx_expectations(report)
    assert [e[:3] for e in expected if not e[3]] == [
        ("class_counts", "expect_column_values_to_be_between", "total"),
        ("class_counts", "expect_column_values_to_be_between", "test"),
    ]
    rows = expectation_rows(html)
    assert len(rows) == len(expected) == N_EXPECTATIONS
    assert rows[:2] == [
        ("failed", "class_counts", "expect_column_values_to_be_between", "total"),
        ("failed", "class_counts", "expect_column_values_to_be_between", "test"),
    ]
    assert {r[0] for r in rows[2:]} == {"passed"}
    assert "<td><code>min_value=20.0</code></td><td>1 unexpected of 4, e.g. [3]</td>" in html
    assert f'<span class="verdict fail">FAILED</span> 13 of {N_EXPECTATIONS} expectations' in html
    # the class table lists the rare class first, with both problems in words
    classes = html.split('<h2 id="classes">', 1)[1]
    first = re.search(r'<tbody>\n<tr class="failed">(.*?)</tr>', classes).group(1)
    assert f"<td>{escape(RARE)}</td>" in first
    assert f"<td>{escape('; '.join(problems))}</td></tr>" in first + "</tr>"


def test_summary_pages_render_offline(project, failed, browser):
    for page_path, verdict, text in (
        (
            project[0] / "reports/validation/summary.html",
            "PASSED",
            f"{N_EXPECTATIONS} of {N_EXPECTATIONS} expectations met",
        ),
        (failed[0] / "summary.html", "FAILED", f"class '{RARE}' has 3 samples"),
    ):
        context, page, asked = offline_page(browser, page_path.as_uri())
        try:
            assert asked == []
            shown = page.inner_text("body")
            assert verdict in shown and text in shown
            assert page.locator("i").count() == 0  # the class name stayed text
            assert page.locator("#expectation-table tbody tr").count() == N_EXPECTATIONS
            assert page.locator("#expectation-table").is_visible()
        finally:
            context.close()


@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD~1"]], ids=["show", "diff"])
def test_dvc_plots_render_offline(project, browser, command):
    project, _ = project
    run(["dvc", "plots", *command], project)
    index = project / "dvc_plots/index.html"
    html = index.read_text()
    assert_self_contained(html)
    images = re.findall(r'<img src="([^"]+)"', html)
    revisions = ["workspace"] + (["HEAD~1"] if command[0] == "diff" else [])
    assert sorted(images) == sorted(src.format(rev=r) for r in revisions for src in PLOTS.values())
    context, page, asked = offline_page(browser, index.as_uri())
    try:
        assert asked == []
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert sorted(widths) == sorted(40 + i for _ in revisions for i in range(len(PLOTS)))
    finally:
        context.close()
