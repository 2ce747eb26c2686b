"""Small helpers the CLI modules share: JSON output, progress bars, output-path checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import EdgeqError


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def progress(items, desc: str):
    """A tqdm bar on stderr (silent when stderr is not a terminal and EDGEQ_PROGRESS is unset)."""
    import os

    from tqdm import tqdm

    disable = not (sys.stderr.isatty() or os.environ.get("EDGEQ_PROGRESS"))
    return tqdm(items, desc=desc, leave=False, disable=disable, file=sys.stderr)


def check_new_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work starts (the write itself is atomic)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise EdgeqError(f"output: {path} already exists (pass --overwrite to replace it)")
    return path


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
