"""Hardware efficiency reports: every variant and board side by side, from the results database.

`write_report(db, out)` writes HTML, Markdown or JSON (by the file suffix); `write_compare(db, a,
b, out)` compares two stored runs. Modules: `gather` (reads the database and the files it names),
`compare` (envelopes, ratios, Pareto fronts, significance), `document` (the one JSON-ready report
dict), `tables` / `plots` / `render` (text, SVG and page rendering). This package never writes
anything but the output file, and never shows a number that was not measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EdgeqError, choice_error
from ..fileio import write_text_atomic
from ..store import resolve_db_path
from .document import build_compare, build_report

FORMATS = {".html": "html", ".htm": "html", ".md": "md", ".json": "json"}

__all__ = ["build_report", "build_compare", "write_report", "write_compare", "render_compare", "check_not_db",
           "FORMATS"]


def check_not_db(db_path: str | os.PathLike | None, out_path: str | os.PathLike) -> None:
    """Refuse an output that is the results database itself (by any path to it): the report would replace it."""
    db, out = resolve_db_path(db_path), Path(out_path)
    if db.resolve() == out.resolve() or (db.exists() and out.exists() and os.path.samefile(db, out)):
        raise EdgeqError(f"output: {out} is the results database {db}; write the report to another file")


def _format_of(out: Path) -> str:
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise choice_error("output suffix", out.suffix or out.name, sorted(FORMATS))
    return fmt


def write_report(db_path: str | os.PathLike | None, out_path: str | os.PathLike, model: str | None = None,
                 device: str | None = None, force: bool = False, since: str | None = None) -> Path:
    """Build the report from the database and write it (atomically) as HTML, Markdown or JSON by suffix.

    Returns the output path. `force` keeps runs with differing envelopes (or INVALID) in the ratios
    and Pareto fronts, marked as forced.
    """
    from .render import to_html, to_json, to_markdown

    out = Path(out_path)
    check_not_db(db_path, out)
    fmt = _format_of(out)
    doc = build_report(db_path, model=model, device=device, since=since, force=force)
    text = {"html": to_html, "md": to_markdown, "json": to_json}[fmt](doc)
    write_text_atomic(out, text)
    return out


def render_compare(db_path: str | os.PathLike | None, run_a: int, run_b: int, fmt: str = "md") -> str:
    """Run B against run A as Markdown, HTML or JSON text."""
    from .render import compare_to_html, compare_to_markdown, to_json

    doc = build_compare(db_path, run_a, run_b)
    renderers = {"html": compare_to_html, "md": compare_to_markdown, "json": to_json}
    if fmt not in renderers:
        raise choice_error("format", fmt, sorted(renderers))
    return renderers[fmt](doc)


def write_compare(db_path: str | os.PathLike | None, run_a: int, run_b: int, out_path: str | os.PathLike) -> Path:
    """Write the comparison of two runs (result ids) as HTML, Markdown or JSON by suffix."""
    out = Path(out_path)
    check_not_db(db_path, out)
    write_text_atomic(out, render_compare(db_path, run_a, run_b, _format_of(out)))
    return out
