"""Render a report document as self-contained HTML, Markdown or JSON text.

The HTML has its CSS inline and its plots as inline SVG: it fetches nothing (no scripts, fonts,
stylesheets or images from anywhere), so it can be mailed or attached to a CI run as one file.
"""

from __future__ import annotations

import html
import json
from typing import Any

from .tables import NM, Table, compare_tables, flagged_table, model_tables, summary_table

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:12px}
th,td{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eef2f7}tr:nth-child(even) td{background:#fafafa}
td.nm{color:#8a5a00;font-style:italic}td.bad{color:#b00020;font-weight:600}
.note{color:#555;font-size:12px;margin:2px 0}.scroll{overflow-x:auto}.plot svg{max-width:100%;height:auto}
code{background:#f3f3f3;padding:0 3px}
"""


def _cell_class(cell: str) -> str:
    if cell.startswith(NM) or cell.startswith("excluded"):
        return ' class="nm"'
    if cell.startswith("INVALID") or "differs" in cell:
        return ' class="bad"'
    return ""


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td{_cell_class(c)}>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in t.all_notes())
    return (f'<h3>{e(t.title)}</h3><div class="scroll"><table data-table="{e(t.key)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{notes}")


def _methods(doc: dict) -> str:
    return "".join(f'<p class="note"><b>{html.escape(k)}</b>: {html.escape(v)}</p>' for k, v in doc["methods"].items())


def to_html(doc: dict[str, Any], plots: bool = True) -> str:
    """The report as one self-contained HTML page."""
    from .plots import pareto_svg

    e = html.escape
    f = doc["filters"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>edgeq report</title>"
             f"<style>{_CSS}</style></head><body><h1>edgeq hardware efficiency report</h1>",
             f'<p class="note">Generated {e(doc["generated"])} from <code>{e(doc["db"])}</code>; filters: '
             f'model={e(str(f["model"]))}, device={e(str(f["device"]))}, since={e(str(f["since"]))}; '
             f'--force={doc["force"]}. Every number comes from the results database or the files it names.</p>',
             "<h2>Summary</h2>", _html_table(summary_table(doc)), _html_table(flagged_table(doc))]
    if not doc["models"]:
        parts.append('<p class="note">No runs in the database match the filters.</p>')
    for m in doc["models"]:
        parts.append(f'<h2 id="model-{e(m["model"])}">{e(m["model"])}</h2>')
        tables = model_tables(m)
        parts.append(_html_table(tables[0]))
        if plots:
            parts.append(f'<h3>{e(m["model"])}: Pareto plots</h3><div class="plot">{pareto_svg(m)}</div>'
                         '<p class="note">Filled markers joined by a line: on the Pareto front of their group; '
                         "hollow: dominated. Excluded runs are not drawn.</p>")
        parts.extend(_html_table(t) for t in tables[1:])
    parts.append("<h2>Methods</h2>" + _methods(doc) + "</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
             "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    lines += [""] + [f"_{_md_cell(n)}_  " for n in t.all_notes()]
    return "\n".join(lines) + "\n"


def to_markdown(doc: dict[str, Any]) -> str:
    """The report as Markdown (for pull requests); the plots are in the HTML rendering only."""
    parts = ["# edgeq hardware efficiency report", "",
             f"Generated {doc['generated']} from `{doc['db']}`; filters {doc['filters']}; --force={doc['force']}.",
             "Plots: see the HTML rendering (`edgeq report -o report.html`).", "", "## Summary", "",
             _md_table(summary_table(doc)), _md_table(flagged_table(doc))]
    if not doc["models"]:
        parts += ["_No runs in the database match the filters._", ""]
    for m in doc["models"]:
        parts += [f"## {m['model']}", ""] + [_md_table(t) for t in model_tables(m)]
    parts += ["## Methods", ""] + [f"- **{k}**: {v}" for k, v in doc["methods"].items()]
    return "\n".join(parts) + "\n"


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n"


def compare_to_html(doc: dict[str, Any]) -> str:
    tables = "".join(_html_table(t) for t in compare_tables(doc))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>edgeq compare</title>"
            f"<style>{_CSS}</style></head><body><h1>edgeq run comparison</h1>{tables}</body></html>\n")


def compare_to_markdown(doc: dict[str, Any]) -> str:
    return "# edgeq run comparison\n\n" + "".join(_md_table(t) for t in compare_tables(doc))
