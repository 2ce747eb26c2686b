"""The results database: benchmark results from boards and evaluation results, in one SQLite file.

Where it lives: `--db PATH` if given, else the environment variable `EDGEQ_DB`, else
`<user data dir>/edgeq/results.sqlite` (platformdirs). See `resolve_db_path`.

Every row is written in one transaction: a result is either fully stored or not at all. Rows are
never updated after insertion; a re-run adds a new row. JSON columns hold UTF-8 JSON text.

Schema (version 1, recorded in `PRAGMA user_version`):

    results                      one benchmark job on one device
      id                INTEGER  primary key
      created           TEXT     ISO-8601 UTC time the row was stored
      artifact_sha256   TEXT     sha256 of the benchmarked file (the key that ties everything)
      artifact_path     TEXT     path on the host when it was profiled
      artifact_format   TEXT     onnx | tflite
      variant           TEXT     export variant from FILE.json (nullable)
      export_json       TEXT     the artifact's FILE.json, verbatim (nullable JSON)
      quant_json_sha256 TEXT     FILE.json source.quant_json_sha256 (nullable)
      model_ref         TEXT     FILE.json source.model (nullable)
      device            TEXT     device name (devices file name, URL, or "local")
      device_url        TEXT     agent URL
      job_id            TEXT     agent job id
      status            TEXT     valid | invalid | failed | aborted
      invalid_reasons   TEXT     JSON list of strings (empty when valid)
      runtime           TEXT     onnxruntime | litert | litert-compiledmodel | tflite_runtime
      runtime_version   TEXT
      provider          TEXT     execution provider / delegate actually used
      threads           INTEGER
      n_runs            INTEGER  timed inferences
      size_bytes        INTEGER  artifact size (plus external data)
      load_ms           REAL     cold load time
      first_ms          REAL     first inference
      p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms, ci_low_ms, ci_high_ms   REAL
      peak_rss_mb       REAL
      power_w           REAL     mean power over the timed window (nullable)
      energy_mj         REAL     energy per inference, raw, millijoules (nullable)
      energy_net_mj     REAL     energy per inference minus the idle baseline (nullable)
      power_reason      TEXT     why power is null, or the meter used
      fingerprint_sha256 TEXT    sha256 of the canonical fingerprint JSON
      fingerprint       TEXT     JSON: the agent's environment fingerprint
      result            TEXT     JSON: the full result document from the agent (raw latencies too)

    evals                        one evaluation of one target (model, quantized dir or file)
      id                INTEGER  primary key
      created           TEXT
      target_sha256     TEXT     sha256 of the evaluated file (or of quant.json for a directory)
      target_path       TEXT
      model_ref         TEXT
      task              TEXT     e.g. ppl | cosine | top1
      metrics           TEXT     JSON object, e.g. {"ppl": 19.8}
      data              TEXT     what it was evaluated on
      meta              TEXT     JSON object, anything else

Public API (typed, stable): `resolve_db_path`, `check_db`, `require_db`, `init_db`, `record_result`, `list_results`,
`get_result`, `record_eval`, `list_evals`, `damage_note`, and the row types `ResultRecord`, `EvalRecord`.
The database file itself (its path, tables, and opening it to read or to write) is `store_file.py`.
This module imports no torch and writes nothing outside the database file. Reading opens the database read-only: a
missing file is never created, and a file that is not an edgeq results database is never changed (nor written to by
a command that stores a result, unless it is a new, empty database).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import sqlite3
from typing import Any

from .errors import EdgeqError
from .store_file import (ENV_DB, SCHEMA_VERSION, check_db, connect, default_db_path, init_db, require_db,
                         resolve_db_path, select)

__all__ = ["ENV_DB", "SCHEMA_VERSION", "STATUSES", "EvalRecord", "ResultRecord", "check_db", "damage_note",
           "default_db_path", "fingerprint_sha256", "get_result", "init_db", "list_evals", "list_results", "record_eval",
           "record_eval_result", "record_result", "reference_sha256", "require_db", "resolve_db_path"]

STATUSES = ("valid", "invalid", "failed", "aborted")

# JSON column -> the JSON type edgeq stores in it (every column: store_file.RESULT_COLUMNS, EVAL_COLUMNS)
_JSON_RESULT_COLUMNS: dict[str, type] = {"export_json": dict, "invalid_reasons": list, "fingerprint": dict,
                                          "result": dict}

_JSON_EVAL_COLUMNS: dict[str, type] = {"metrics": dict, "meta": dict}
_JSON_KIND = {dict: "object", list: "array"}


@dataclasses.dataclass(frozen=True)
class ResultRecord:
    """One row of `results`; JSON columns are decoded (dict / list / None)."""

    id: int
    created: str
    artifact_sha256: str
    artifact_path: str | None
    artifact_format: str | None
    variant: str | None
    export_json: dict | None
    quant_json_sha256: str | None
    model_ref: str | None
    device: str
    device_url: str | None
    job_id: str | None
    status: str
    invalid_reasons: list | None
    runtime: str | None
    runtime_version: str | None
    provider: str | None
    threads: int | None
    n_runs: int | None
    size_bytes: int | None
    load_ms: float | None
    first_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    std_ms: float | None
    min_ms: float | None
    max_ms: float | None
    ci_low_ms: float | None
    ci_high_ms: float | None
    peak_rss_mb: float | None
    power_w: float | None
    energy_mj: float | None
    energy_net_mj: float | None
    power_reason: str | None
    fingerprint_sha256: str | None
    fingerprint: dict | None
    result: dict | None
    damaged: tuple[str, ...] = ()  # JSON columns that did not read (see `damage_note`), here None

    def to_dict(self) -> dict[str, Any]:
        """The stored row (without `damaged`, which says how it read)."""
        return _row_dict(self)


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One row of `evals`; `metrics` and `meta` are decoded dicts."""

    id: int
    created: str
    target_sha256: str
    target_path: str | None
    model_ref: str | None
    task: str
    metrics: dict
    data: str | None
    meta: dict | None
    damaged: tuple[str, ...] = ()  # JSON columns that did not read (see `damage_note`), here None

    def to_dict(self) -> dict[str, Any]:
        """The stored row (without `damaged`, which says how it read)."""
        return _row_dict(self)


def _row_dict(rec: ResultRecord | EvalRecord) -> dict[str, Any]:
    out = dataclasses.asdict(rec)
    del out["damaged"]
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def fingerprint_sha256(fingerprint: dict | None) -> str | None:
    """sha256 of the canonical (sorted-key) JSON of a fingerprint; None for None."""
    if fingerprint is None:
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def _result_row(result: dict, artifact_path: str | None, export_meta: dict | None,
                device: str, device_url: str | None) -> dict[str, Any]:
    lat = result.get("latency_ms") or {}
    ci = lat.get("ci95_median") or [None, None]
    power = result.get("power") or {}
    rt = result.get("runtime") or {}
    source = (export_meta or {}).get("source") or {}
    fp = result.get("fingerprint")
    sha = result.get("artifact_sha256") or (export_meta or {}).get("sha256")
    if not sha:
        raise EdgeqError("result: artifact_sha256 is missing; a result must be tied to an artifact hash")
    status = result.get("status")
    if status not in STATUSES:
        raise EdgeqError(f"result: status {status!r} is not one of: {', '.join(STATUSES)}")
    return {
        "created": _now(),
        "artifact_sha256": sha,
        "artifact_path": artifact_path,
        "artifact_format": result.get("format") or (export_meta or {}).get("format"),
        "variant": (export_meta or {}).get("variant"),
        "export_json": _dumps(export_meta),
        "quant_json_sha256": source.get("quant_json_sha256"),
        "model_ref": source.get("model"),
        "device": device,
        "device_url": device_url,
        "job_id": result.get("job_id"),
        "status": status,
        "invalid_reasons": _dumps(result.get("invalid_reasons") or []),
        "runtime": rt.get("name"),
        "runtime_version": rt.get("version"),
        "provider": rt.get("provider"),
        "threads": result.get("threads"),
        "n_runs": lat.get("n"),
        "size_bytes": result.get("size_bytes"),
        "load_ms": result.get("load_ms"),
        "first_ms": result.get("first_inference_ms"),
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
        "mean_ms": lat.get("mean"),
        "std_ms": lat.get("std"),
        "min_ms": lat.get("min"),
        "max_ms": lat.get("max"),
        "ci_low_ms": ci[0],
        "ci_high_ms": ci[1],
        "peak_rss_mb": result.get("peak_rss_mb"),
        "power_w": power.get("mean_w"),
        "energy_mj": power.get("energy_per_inference_mj"),
        "energy_net_mj": power.get("energy_per_inference_net_mj"),
        "power_reason": power.get("reason") or power.get("meter"),
        "fingerprint_sha256": fingerprint_sha256(fp),
        "fingerprint": _dumps(fp),
        "result": _dumps(result),
    }


def record_result(db_path: str | os.PathLike | None, result: dict, *, device: str,
                  device_url: str | None = None, artifact_path: str | None = None,
                  export_meta: dict | None = None) -> int:
    """Store one agent result document (see edgeq.agent.protocol RESULT) and return its row id.

    `export_meta` is the artifact's FILE.json (or None); its `source` ties the row to quant.json.
    """
    row = _result_row(result, artifact_path, export_meta, device, device_url)
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    with connect(db_path) as conn, conn:
        cur = conn.execute(f"INSERT INTO results ({cols}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)


def _decode(row: sqlite3.Row, json_cols: dict[str, type]) -> dict[str, Any]:
    """The row with its JSON columns decoded. A column that is not valid JSON of its type (edited or damaged) reads as
    None and is named in `damaged`, so one bad row does not make the whole database unreadable."""
    out, damaged = dict(row), []
    for col, kind in json_cols.items():
        if out[col] is None:
            continue
        try:
            out[col] = json.loads(out[col])
        except ValueError:
            out[col] = None
        if not isinstance(out[col], kind):
            out[col] = None
            damaged.append(col)
    return {**out, "damaged": tuple(damaged)}


def damage_note(rec: ResultRecord | EvalRecord) -> str:
    """What is wrong with a damaged row (`rec.damaged`): `column export_json is not a valid JSON object`."""
    cols = _JSON_RESULT_COLUMNS if isinstance(rec, ResultRecord) else _JSON_EVAL_COLUMNS
    return "; ".join(f"column {c} is not a valid JSON {_JSON_KIND[cols[c]]}" for c in rec.damaged)


def _query(table: str, where: list[str], args: list, limit: int | None) -> tuple[str, list]:
    """The SELECT of `table`'s rows matching `where` (on `args`), newest first, at most `limit` of them."""
    sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
    return (sql, args) if limit is None else (sql + " LIMIT ?", [*args, limit])


def list_results(db_path: str | os.PathLike | None = None, *, artifact_sha256: str | None = None,
                 device: str | None = None, status: str | None = None,
                 limit: int | None = None) -> list[ResultRecord]:
    """Results, newest first, optionally filtered by artifact hash (prefix), device and status.

    A database that does not exist yet has none (it is not created). A row whose JSON does not read is returned with
    those columns None and named in its `damaged` (see `damage_note`)."""
    if not resolve_db_path(db_path).exists():
        return []
    where, args = [], []
    if artifact_sha256:
        where.append("artifact_sha256 LIKE ?")
        args.append(artifact_sha256 + "%")
    if device:
        where.append("device = ?")
        args.append(device)
    if status:
        where.append("status = ?")
        args.append(status)
    rows = select(db_path, *_query("results", where, args, limit))
    return [ResultRecord(**_decode(r, _JSON_RESULT_COLUMNS)) for r in rows]


def get_result(db_path: str | os.PathLike | None, result_id: int) -> ResultRecord:
    """One result by row id; EdgeqError if there is none, or if its stored JSON does not read."""
    rows = select(db_path, "SELECT * FROM results WHERE id = ?", (int(result_id),))
    if not rows:
        raise EdgeqError(f"result id: {result_id} is not in the database")
    rec = ResultRecord(**_decode(rows[0], _JSON_RESULT_COLUMNS))
    if rec.damaged:
        raise EdgeqError(f"db: {resolve_db_path(db_path)}: result {result_id} is damaged: {damage_note(rec)}")
    return rec


def record_eval(db_path: str | os.PathLike | None, *, target_sha256: str, target_path: str | None,
                model_ref: str | None, task: str, metrics: dict, data: str | None = None,
                meta: dict | None = None) -> int:
    """Store one evaluation result and return its row id."""
    if not target_sha256:
        raise EdgeqError("eval: target_sha256 is required")
    if not isinstance(metrics, dict):
        raise EdgeqError(f"eval: metrics must be a dict, got {type(metrics).__name__}")
    row = {
        "created": _now(), "target_sha256": target_sha256,
        "target_path": None if target_path is None else str(target_path),
        "model_ref": model_ref, "task": task, "metrics": _dumps(metrics), "data": data,
        "meta": _dumps(meta),
    }
    with connect(db_path) as conn, conn:
        cur = conn.execute(f"INSERT INTO evals ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                           tuple(row.values()))
        return int(cur.lastrowid)


def list_evals(db_path: str | os.PathLike | None = None, *, target_sha256: str | None = None,
               task: str | None = None, model_ref: str | None = None,
               limit: int | None = None) -> list[EvalRecord]:
    """Evaluations, newest first, optionally filtered by target hash (prefix), task and model (a missing database
    has none; a damaged row is returned as `list_results` returns one)."""
    if not resolve_db_path(db_path).exists():
        return []
    where, args = [], []
    if target_sha256:
        where.append("target_sha256 LIKE ?")
        args.append(target_sha256 + "%")
    if task:
        where.append("task = ?")
        args.append(task)
    if model_ref:
        where.append("model_ref = ?")
        args.append(model_ref)
    rows = select(db_path, *_query("evals", where, args, limit))
    return [EvalRecord(**_decode(r, _JSON_EVAL_COLUMNS)) for r in rows]


def reference_sha256(model_ref: str) -> str:
    """A stable key for a float model reference that has no file: sha256 of "model-ref:" + the reference."""
    return hashlib.sha256(f"model-ref:{model_ref}".encode("utf-8")).hexdigest()


def record_eval_result(db_path: str | os.PathLike | None, result: dict) -> int:
    """Store one `edgeq.evaluate.evaluate()` result and return its row id.

    The target's file hash (or quant.json hash for a quantized directory) is the key; a float
    model reference has no file, so it is keyed by `reference_sha256(model)` (meta records that).
    """
    missing = [k for k in ("task", "metrics") if k not in result]
    if missing:
        raise EdgeqError(f"eval result: missing keys {missing}")
    meta = {k: v for k, v in result.items() if k not in ("sha256", "target", "model", "task", "metrics", "data")}
    sha = result.get("sha256")
    if not sha:
        ref = result.get("model") or result.get("target")
        if not ref:
            raise EdgeqError("eval result: has neither a sha256 nor a model reference to key it by")
        sha = reference_sha256(str(ref))
        meta["sha256_of"] = "model reference (no file)"
    return record_eval(db_path, target_sha256=sha, target_path=result.get("target"),
                       model_ref=result.get("model"), task=result["task"], metrics=result["metrics"],
                       data=result.get("data"), meta=meta)
