"""A self-contained HTML page of the validation results, readable with no network.

GX's Data Docs load their styles and scripts from CDNs and render blank offline; this page
has inline CSS only (no script, no external file) and shows what the gate decided: the
failed checks first, then every expectation of the four suites (from GX's own result JSON),
the rows quarantined against ``validate.max_quarantine_frac`` and the per-class counts against
``validate.min_per_class``. Every value is HTML-escaped.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

# kwargs that only identify the batch or the column, shown in their own cells
_HIDDEN_KWARGS = ("batch_id", "column", "result_format", "catch_exceptions")
# longest list (e.g. 3,075 CIFAR column names) and text shown in one cell
MAX_ITEMS = 12
MAX_TEXT = 300

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin: 0 0 .3em; } h2 { font-size: 1.15em; margin: 1.6em 0 .4em; }
.verdict { display: inline-block; padding: .25em .8em; border-radius: 4px; font-weight: 600; }
.pass { background: #dff3e2; color: #155724; } .fail { background: #fbe0e0; color: #8a1c1c; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8e8; } tr.failed td.status { color: #8a1c1c; font-weight: 600; }
td.status { color: #155724; white-space: nowrap; }
code { font: 12px ui-monospace, monospace; word-break: break-word; }
ul.failures li { color: #8a1c1c; margin: .2em 0; } dl { margin: 0; }
dt { float: left; clear: left; width: 11em; color: #555; } dd { margin-left: 11em; }
"""


def _short(value) -> str:
    """``value`` as compact text: long lists cut to MAX_ITEMS, long text to MAX_TEXT."""
    if isinstance(value, list) and len(value) > MAX_ITEMS:
        shown = json.dumps(value[:MAX_ITEMS], default=str)[:-1]
        text = f"{shown}, … ({len(value)} items)]"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _outcome(result: dict, exception_info: dict | None) -> str:
    """The observed value, or the unexpected count with examples, of one expectation."""
    if exception_info and exception_info.get("raised_exception"):
        return f"error: {exception_info.get('exception_message')}"
    parts = []
    if "unexpected_count" in result:
        count = result["unexpected_count"]
        part = f"{count} unexpected"
        if result.get("element_count") is not None:
            part += f" of {result['element_count']}"
        examples = result.get("partial_unexpected_list") or []
        if count and examples:
            part += f", e.g. {_short(examples)}"
        parts.append(part)
    if result.get("observed_value") is not None:
        parts.append(f"observed {_short(result['observed_value'])}")
    return "; ".join(parts) or "—"


def expectation_rows(validations: list[dict]) -> list[dict]:
    """One row per expectation in GX's validation-result JSON, failed ones first."""
    rows = []
    for validation in validations:
        for r in validation.get("results", []):
            config = r.get("expectation_config") or {}
            kwargs = config.get("kwargs") or {}
            shown = {k: v for k, v in kwargs.items() if k not in _HIDDEN_KWARGS}
            rows.append(
                {
                    "suite": validation.get("suite_name", ""),
                    "type": config.get("type", ""),
                    "column": kwargs.get("column"),
                    "kwargs": ", ".join(f"{k}={_short(v)}" for k, v in shown.items()),
                    "success": bool(r.get("success")),
                    "outcome": _outcome(r.get("result") or {}, r.get("exception_info")),
                }
            )
    return sorted(rows, key=lambda row: row["success"])  # stable: suite order otherwise


def _status(ok: bool, failed_text: str = "FAILED") -> str:
    return '<td class="status">passed</td>' if ok else f'<td class="status">{failed_text}</td>'


def _tr(ok: bool, cells: str) -> str:
    return f'<tr class="{"passed" if ok else "failed"}">{cells}</tr>'


def render(
    summary: dict,
    validations: list[dict],
    *,
    dataset: str,
    max_quarantine_frac: float,
    min_per_class: int,
    links: dict[str, str],
) -> str:
    """The page as one string. ``summary`` is the stage's summary.json content (with
    ``class_counts``), ``validations`` GX's result JSON per suite, ``links`` label → relative
    path of the files beside the page."""
    e = escape
    when = next(
        (v.get("meta", {}).get("validation_time") for v in validations if v.get("meta")), None
    )
    ok = bool(summary["success"])
    rows = expectation_rows(validations)
    failed_rows = sum(not row["success"] for row in rows)
    checks = "" if ok else f"; {len(summary['failures'])} check(s) failed"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Validation {'passed' if ok else 'FAILED'}: {e(dataset)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Data validation: {e(dataset)}</h1>",
        f'<p><span class="verdict {"pass" if ok else "fail"}">'
        f"{'PASSED' if ok else 'FAILED'}</span> "
        f"{len(rows) - failed_rows} of {len(rows)} expectations met{checks}</p>",
        "<dl>",
        f"<dt>Dataset</dt><dd>{e(dataset)}</dd>",
        f"<dt>Validated at</dt><dd>{e(str(when or 'unknown'))}</dd>",
        f"<dt>Rows in</dt><dd>{summary['rows_in']}</dd>",
        f"<dt>Rows quarantined</dt><dd>{summary['rows_quarantined']}</dd>",
    ]
    if "splits" in summary:
        splits = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
        out.append(f"<dt>Prepared rows</dt><dd>{summary['rows_out']} ({e(splits)})</dd>")
    for label, href in links.items():
        out.append(f'<dt>{e(label)}</dt><dd><a href="{e(href)}">{e(href)}</a></dd>')
    out.append("</dl>")

    if summary["failures"]:
        out.append('<h2 id="failures">Failed checks</h2><ul class="failures">')
        out += [f"<li>{e(line)}</li>" for line in summary["failures"]]
        out.append("</ul>")

    out.append(
        '<h2 id="expectations">Expectations</h2><table id="expectation-table"><thead><tr>'
        "<th>Result</th><th>Suite</th><th>Expectation</th><th>Column</th><th>Arguments</th>"
        "<th>Observed / unexpected</th></tr></thead><tbody>"
    )
    for row in rows:
        cells = (
            _status(row["success"])
            + f"<td>{e(row['suite'])}</td><td><code>{e(row['type'])}</code></td>"
            f"<td>{e(str(row['column'] or '(table)'))}</td>"
            f"<td><code>{e(row['kwargs'])}</code></td><td>{e(row['outcome'])}</td>"
        )
        out.append(_tr(row["success"], cells))
    out.append("</tbody></table>")

    quarantined, rows_in = summary["rows_quarantined"], summary["rows_in"]
    frac = quarantined / rows_in if rows_in else 0.0
    within = frac <= max_quarantine_frac
    out.append(
        '<h2 id="quarantine">Quarantine</h2><table><thead><tr><th>Result</th><th>Check</th>'
        "<th>Observed</th></tr></thead><tbody>"
    )
    out.append(
        _tr(
            within,
            _status(within)
            + f"<td>at most validate.max_quarantine_frac={max_quarantine_frac:g} of the rows "
            f"quarantined</td><td>{quarantined} of {rows_in} ({frac:.1%})</td>",
        )
    )
    out.append("</tbody></table>")
    reasons = summary.get("quarantine_reasons") or {}
    if reasons:
        out.append("<table><thead><tr><th>Rows</th><th>Reason</th></tr></thead><tbody>")
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            out.append(f'<tr><td class="num">{n}</td><td>{e(str(reason))}</td></tr>')
        out.append("</tbody></table>")

    counts = summary.get("class_counts") or []
    out.append(
        f'<h2 id="classes">Samples per class</h2><p>Each class needs at least '
        f"validate.min_per_class={min_per_class} samples and one in every split.</p>"
    )
    if counts:
        splits = [k for k in counts[0] if k not in ("label", "name", "total", "problems")]
        head = "".join(f"<th>{e(s)}</th>" for s in splits)
        out.append(
            "<table><thead><tr><th>Result</th><th>Label</th><th>Class</th>"
            f"{head}<th>Total</th><th>Problem</th></tr></thead><tbody>"
        )
        for c in sorted(counts, key=lambda c: not c["problems"]):
            good = not c["problems"]
            cells = (
                _status(good)
                + f'<td class="num">{e(str(c["label"]))}</td><td>{e(str(c["name"]))}</td>'
                + "".join(f'<td class="num">{e(str(c[s]))}</td>' for s in splits)
                + f'<td class="num">{e(str(c["total"]))}</td>'
                f"<td>{e('; '.join(c['problems']))}</td>"
            )
            out.append(_tr(good, cells))
        out.append("</tbody></table>")
    else:
        out.append("<p>No class counts: the table has no label or split column.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write(path: Path, *args, **kwargs) -> Path:
    """Write :func:`render`'s page to ``path``."""
    path.write_text(render(*args, **kwargs), encoding="utf-8")
    return path
