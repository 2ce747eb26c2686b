"""Small helpers the CLI modules share: JSON output, progress bars, output-path checks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..console import progress_shown
from ..errors import EdgeqError


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def progress(items, desc: str):
    """A tqdm bar on stderr (silent when stderr is not a terminal and EDGEQ_PROGRESS is unset)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, disable=not progress_shown(), file=sys.stderr)


def check_new_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output file, or one that cannot be written, before any work starts (the write itself is
    atomic, into a temporary name beside `path`)."""
    path = Path(path)
    if path.is_dir():
        raise EdgeqError(f"output: {path} is a directory (name the file to write)")
    if path.exists() and not overwrite:
        raise EdgeqError(f"output: {path} already exists (pass --overwrite to replace it)")
    check_writable_parent(path)
    return path


def check_new_dir(path: str | Path, overwrite: bool, marker: str = "quant.json",
                  what: str = "a quantized-model directory", option: str = "output") -> Path:
    """Refuse an output directory that exists (unless empty), or one that cannot be written, before any work starts;
    `--overwrite` replaces only what edgeq wrote there (`what`, which holds `marker`), never a directory of the user's;
    `option` names the option in the error."""
    path = Path(os.path.abspath(path))  # `-o .` names the directory itself
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        if not overwrite:
            raise EdgeqError(f"{option}: {path} already exists (pass --overwrite to replace it)")
        if not (path / marker).is_file():
            raise EdgeqError(f"{option}: {path} is not {what} (no {marker}), and edgeq replaces only what it "
                             "wrote: choose another path")
    check_writable_parent(path, option)
    return path


def check_results_db(db: str | Path | None) -> None:
    """The results database a command will store into (None: $EDGEQ_DB or the default) can take the result: checked
    before the work, which a database that cannot be written would otherwise lose."""
    from ..store import check_db, resolve_db_path

    check_writable_parent(resolve_db_path(db), "--db")
    check_db(db)


def check_writable_parent(path: str | Path, what: str = "output") -> None:
    """The nearest existing ancestor of `path` must be a directory this process can create entries in (the
    directories between are made when the output is written); `what` names the option in the error."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EdgeqError(f"{what}: cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeqError(f"{what}: cannot write {path}: no permission to write in {parent}")


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
