"""The results database as a file: where it is, its tables, and opening it to read or to write (`store.py` has the
rows and the public API; its docstring, the schema).

Reading opens the file read-only (`read_only`, `select`): a missing file is never created, and a file that is not
an edgeq results database is never changed. Writing (`connect`) creates the tables in a new or empty file, checked
and created under SQLite's write lock, and refuses any other program's database.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Iterator

from .errors import EdgeqError

SCHEMA_VERSION = 1
ENV_DB = "EDGEQ_DB"

RESULT_COLUMNS: dict[str, str] = {
    "created": "TEXT NOT NULL",
    "artifact_sha256": "TEXT NOT NULL",
    "artifact_path": "TEXT",
    "artifact_format": "TEXT",
    "variant": "TEXT",
    "export_json": "TEXT",
    "quant_json_sha256": "TEXT",
    "model_ref": "TEXT",
    "device": "TEXT NOT NULL",
    "device_url": "TEXT",
    "job_id": "TEXT",
    "status": "TEXT NOT NULL",
    "invalid_reasons": "TEXT",
    "runtime": "TEXT",
    "runtime_version": "TEXT",
    "provider": "TEXT",
    "threads": "INTEGER",
    "n_runs": "INTEGER",
    "size_bytes": "INTEGER",
    "load_ms": "REAL",
    "first_ms": "REAL",
    "p50_ms": "REAL",
    "p90_ms": "REAL",
    "p99_ms": "REAL",
    "mean_ms": "REAL",
    "std_ms": "REAL",
    "min_ms": "REAL",
    "max_ms": "REAL",
    "ci_low_ms": "REAL",
    "ci_high_ms": "REAL",
    "peak_rss_mb": "REAL",
    "power_w": "REAL",
    "energy_mj": "REAL",
    "energy_net_mj": "REAL",
    "power_reason": "TEXT",
    "fingerprint_sha256": "TEXT",
    "fingerprint": "TEXT",
    "result": "TEXT",
}

EVAL_COLUMNS: dict[str, str] = {
    "created": "TEXT NOT NULL",
    "target_sha256": "TEXT NOT NULL",
    "target_path": "TEXT",
    "model_ref": "TEXT",
    "task": "TEXT NOT NULL",
    "metrics": "TEXT NOT NULL",
    "data": "TEXT",
    "meta": "TEXT",
}
_TABLES = {"results", "evals"}


def default_db_path() -> Path:
    """`<user data dir>/edgeq/results.sqlite`."""
    import platformdirs

    return Path(platformdirs.user_data_dir("edgeq", appauthor=False)) / "results.sqlite"


def resolve_db_path(db: str | os.PathLike | None = None) -> Path:
    """The database path: `db` if given, else `$EDGEQ_DB`, else `default_db_path()`."""
    if db:
        return Path(db).expanduser()
    if os.environ.get(ENV_DB):
        return Path(os.environ[ENV_DB]).expanduser()
    return default_db_path()


def check_db(db_path: str | os.PathLike | None) -> None:
    """Before a run whose result goes to `db_path`: an existing file there must be a results database this edgeq can
    write (or an empty one, which the first result initializes), so no board time (or evaluation) is spent on a
    result that could not be stored, and no other program's database gets edgeq's tables. Opened read-only, nothing
    is changed; a missing database is created when the first result is stored."""
    path = resolve_db_path(db_path)
    if not path.exists():
        return
    with read_only(path) as conn:
        check_schema(conn, path, empty_ok=True)
    if not os.access(path, os.W_OK):
        raise EdgeqError(f"db: {path} cannot be written by this user")


def require_db(db_path: str | os.PathLike | None) -> Path:
    """The path of the results database a command only reads; EdgeqError if there is no file there."""
    path = resolve_db_path(db_path)
    if not path.exists():
        raise EdgeqError(f"db: {path} does not exist (run `edgeq profile` first, or pass --db)")
    if not path.is_file():
        raise EdgeqError(f"db: {path} is not a file")
    return path


def init_db(db_path: str | os.PathLike | None) -> Path:
    """Create an empty results database at `db_path` (an existing one is checked, not changed); returns its path."""
    with connect(db_path):
        pass
    return resolve_db_path(db_path)


def check_schema(conn: sqlite3.Connection, path: Path, *, empty_ok: bool) -> None:
    """`path` holds edgeq's tables at a schema version this edgeq knows; with `empty_ok` it may also have no tables at
    all (a new file, which storing a result initializes)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
              if not name.startswith("sqlite_")}
    if tables >= _TABLES and version > SCHEMA_VERSION:
        raise EdgeqError(f"db: {path} has schema version {version}; this edgeq knows up to {SCHEMA_VERSION}")
    if tables >= _TABLES and version == SCHEMA_VERSION:
        return
    if not tables and version == 0:
        if empty_ok:
            return
        raise EdgeqError(f"db: {path} is not an edgeq results database (it is empty: nothing was stored in it)")
    raise EdgeqError(f"db: {path} is not an edgeq results database (its tables: {', '.join(sorted(tables)) or 'none'}; "
                     f"schema version {version}); pass --db with another file")


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the existing file `path` (SQLite errors as one-line EdgeqErrors)."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise EdgeqError(f"db: cannot open {path}: {exc}") from None
    try:
        conn.row_factory = sqlite3.Row
        yield conn
    except sqlite3.Error as exc:
        raise EdgeqError(f"db: {path}: {exc}") from None
    finally:
        conn.close()


def select(db_path: str | os.PathLike | None, sql: str, args: list | tuple) -> list[sqlite3.Row]:
    """The rows of a query on an existing edgeq results database, opened read-only."""
    path = require_db(db_path)
    with read_only(path) as conn:
        check_schema(conn, path, empty_ok=False)
        return conn.execute(sql, args).fetchall()


def _create_sql(table: str, columns: dict[str, str]) -> str:
    cols = ", ".join(f"{k} {v}" for k, v in columns.items())
    return f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols})"


@contextlib.contextmanager
def connect(db_path: str | os.PathLike | None) -> Iterator[sqlite3.Connection]:
    path = resolve_db_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), timeout=30)
    except sqlite3.Error as exc:
        raise EdgeqError(f"db: cannot open {path}: {exc}") from exc
    try:
        conn.execute("BEGIN IMMEDIATE")  # checked and created under the write lock: two first writers cannot race
        check_schema(conn, path, empty_ok=True)
        conn.execute(_create_sql("results", RESULT_COLUMNS))
        conn.execute(_create_sql("evals", EVAL_COLUMNS))
        conn.execute("CREATE INDEX IF NOT EXISTS results_sha ON results(artifact_sha256)")
        conn.execute("CREATE INDEX IF NOT EXISTS evals_sha ON evals(target_sha256)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.commit()
        yield conn
    except sqlite3.DatabaseError as exc:
        raise EdgeqError(f"db: {path}: {exc}") from exc
    finally:
        conn.close()
