"""The agent's durable job journal (SQLite, WAL, synchronous=FULL).

A job's state only moves forward: queued -> running -> done | failed, or -> aborted. On start-up,
every job left queued or running by a previous process (crash, kill, reboot) becomes `aborted`:
a result is `done` only if the runner finished and its result was committed here.
The journal never stores model bytes, only hashes, the request and the result JSON.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from .protocol import FINAL_STATES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY,
  request_sha256 TEXT NOT NULL,
  artifact_sha256 TEXT NOT NULL,
  request TEXT NOT NULL,
  state TEXT NOT NULL,
  created REAL NOT NULL,
  started REAL,
  finished REAL,
  error TEXT,
  result TEXT
)
"""


class Journal:
    """Thread-safe access to the jobs table of one agent data directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False,
                                     isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)
        for suffix in ("", "-wal", "-shm"):  # requests and results are the agent user's alone
            path = self.path.with_name(self.path.name + suffix)
            if path.exists():
                path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def recover(self) -> int:
        """Mark jobs a previous agent process left unfinished as aborted; returns how many."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE jobs SET state='aborted', finished=?, "
                "error='the agent stopped (crash, kill or restart) before this job finished' "
                "WHERE state IN ('queued', 'running')", (time.time(),))
            return cur.rowcount

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["request"] = json.loads(job["request"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        return job

    def insert(self, job_id: str, request_sha256: str, artifact_sha256: str, request: dict) -> bool:
        """Add a queued job; False if the id already exists (the caller then compares hashes)."""
        with self._lock:
            try:
                self._conn.execute(
                    "INSERT INTO jobs (job_id, request_sha256, artifact_sha256, request, state, created) "
                    "VALUES (?, ?, ?, ?, 'queued', ?)",
                    (job_id, request_sha256, artifact_sha256, json.dumps(request), time.time()))
            except sqlite3.IntegrityError:
                return False
        return True

    def start(self, job_id: str) -> bool:
        """queued -> running; False if the job is no longer queued."""
        with self._lock:
            cur = self._conn.execute("UPDATE jobs SET state='running', started=? "
                                     "WHERE job_id=? AND state='queued'", (time.time(), job_id))
            return cur.rowcount == 1

    def finish(self, job_id: str, state: str, result: dict | None, error: str | None) -> None:
        """running -> a final state, with the result document, in one transaction."""
        assert state in FINAL_STATES
        with self._lock:
            self._conn.execute(
                "UPDATE jobs SET state=?, finished=?, error=?, result=? WHERE job_id=? AND state='running'",
                (state, time.time(), error, json.dumps(result) if result is not None else None, job_id))

    def prune(self, keep: int, max_age_s: float) -> list[str]:
        """Forget finished jobs past the newest `keep` or older than `max_age_s`; returns their ids (the caller
        removes their directories). Queued and running jobs are never pruned."""
        final = tuple(sorted(FINAL_STATES))
        marks = ",".join("?" * len(final))
        with self._lock:
            rows = self._conn.execute(
                f"SELECT job_id FROM jobs WHERE state IN ({marks}) AND (finished < ? OR job_id NOT IN "
                f"(SELECT job_id FROM jobs WHERE state IN ({marks}) ORDER BY finished DESC LIMIT ?))",
                (*final, time.time() - max_age_s, *final, keep)).fetchall()
            ids = [r[0] for r in rows]
            self._conn.executemany("DELETE FROM jobs WHERE job_id=?", [(i,) for i in ids])
        return ids

    def active_artifacts(self) -> set[str]:
        """The sha256 of every file a queued or running job names (the artifact store keeps them)."""
        with self._lock:
            rows = self._conn.execute("SELECT request FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        out = set()
        for (request,) in rows:
            req = json.loads(request)
            out.update(ref["sha256"] for ref in [req["artifact"], *req.get("files", [])])
        return out

    def queued(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute("SELECT job_id FROM jobs WHERE state='queued' ORDER BY created").fetchall()
        return [r[0] for r in rows]
