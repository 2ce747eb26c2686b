"""The edgeq agent protocol, version 1: what host and board say to each other, and who is trusted.

Trust model
-----------
The agent runs models it is given, so anyone who can talk to it can make the board compute.
It therefore trusts exactly one thing: a secret bearer token (>= 16 characters, read from a file
that only the agent's user can read). Every request, reads included, must carry
`Authorization: Bearer <token>`; the agent compares it with `hmac.compare_digest` (constant
time) and answers 401 otherwise, before it reads the body. TLS is optional (`--tls-cert/--tls-key`)
and strongly advised off loopback; with `--client-ca` the agent also requires a client
certificate signed by that CA (mutual TLS). A plaintext request to a TLS agent fails the TLS
handshake and is dropped.

What a caller can NOT do, even with the token: run code (bodies are JSON, never pickle, and
models are data for onnxruntime / LiteRT, loaded in a child process with memory and time
limits; should a runtime's bug still run code, that process is sandboxed where the kernel allows
it: namespaces with read-only files, no network or Unix sockets, its own job's directory only, the
token and TLS key hidden, no capabilities: `sandbox.py`, reported as the result's `sandbox`); name
files outside the job directory (file names are plain base names, ONNX external data must stay
inside the job directory: `../`, absolute paths and symlinks are refused before loading); choose
the power meter or any command (that is agent-side configuration only);
exhaust memory with a body (every body is size-capped BEFORE it is buffered: Content-Length is
required and checked, then the body is streamed with a hard cap); exhaust threads or the queue
(at most 256 queued jobs -> 429; connections: below); fill the disk (uploads are content-addressed
and kept within `--max-store-gb`, least recently used evicted first, and an upload that would leave
less than `--min-free-mb` free is refused -> 507 before a byte is written: `artifacts.py`; a job
does not start with less free; a job keeps only its small files once it ends, and the newest 1000
finished jobs of the last 30 days are kept; a result keeps at most 10000 raw latencies).
What a caller WITHOUT the token can NOT do: keep the token holder out or hold the agent's memory.
Request line and headers are capped at 32 KiB and 64 lines before the token is read (-> 431) and
must arrive within 10 s in all (TLS handshake included), not per read; at most 32 connections wait
without a valid token, a new one closes the oldest of them; authenticated connections have their
own 64 (-> 503 past it). A body must arrive within 30 s or at 128 KiB/s, whichever is longer.
Numbers, lengths and names are checked in full (no NaN, no 5000-digit integers, no trailing
newline in a job id): a bad request is a 4xx JSON error, and the agent keeps serving.
What the token does NOT protect against: a holder of the token can keep the board busy, and keep
the store full of files it keeps using (then other uploads get 507 until those jobs are done).

Transport
---------
HTTP/1.1 (or HTTPS), JSON bodies with `Content-Type: application/json`, at most
`MAX_MESSAGE_BYTES`. Every JSON message is an object with `"protocol": 1` and a `"type"` from
`MESSAGE_TYPES`; anything else is refused with 400 (unknown type) or 415 (not JSON).

    GET  /v1/info                  -> INFO        agent version, protocol, runtimes, fingerprint
    PUT  /v1/artifacts/<sha256>    raw bytes, application/octet-stream, <= max upload size;
                                   stored only if the bytes hash to <sha256> -> {"sha256", "size"}
    POST /v1/jobs                  SUBMIT -> JOB  (201 new, 200 known id with the same request)
    GET  /v1/jobs/<job_id>         -> JOB         state: queued | running | done | failed | aborted
    GET  /v1/jobs/<job_id>/result  -> RESULT      (409 while the job has not finished)

SUBMIT: `{"protocol": 1, "type": "submit", "job_id": ID, "artifact": {"name", "sha256"},
"files": [{"name", "sha256"}, ...] (ONNX external data), "metadata": {...} | null (the artifact's
FILE.json, of which `inputs` sets the inputs and `runtime_min`, with `sha256` and `variant`, is held against
the board's runtime before the file loads; other keys are dropped), "config": CONFIG}`.

Job ids match `JOB_ID_RE`. Submitting the same id again returns the same job and, once it has
finished, the same result: a job runs at most once. The same id with a different request
(artifact hash, files or config) is refused with 409. The agent keeps its jobs in a SQLite journal;
a job that was queued or running when the agent stopped is `aborted` on restart, never `done`.

CONFIG keys (all optional, unknown keys refused): `runs` (minimum timed runs, default 50),
`min_seconds` (minimum timed duration, default 1.0), `max_seconds` (stop timing after this, 60),
`warmup_min` (5), `warmup_max` (200), `warmup_tolerance` (0.05), `threads` (default 1),
`seed` (0), `dims` (symbolic dim -> size, default batch 1, sequence 64), `timeout_s` (job wall
limit, capped by the agent), `memory_mb` (job address-space limit, capped by the agent),
`power` (bool, default true), `signature` (TFLite only: the signature to run, e.g. `decode`;
default null = the file's first subgraph), `weight_cache` (TFLite only, bool, default false: load
through LiteRT's CompiledModel with XNNPACK's weight cache in memory, so signatures sharing a weight
share its packed copy; default: LiteRT's Interpreter).

RESULT: `{"protocol", "job_id", "state", "status": valid|invalid|failed|aborted,
"invalid_reasons": [...], "error": str|null, "artifact_sha256", "format", "size_bytes",
"load_ms", "first_inference_ms", "warmup": {...}, "threads", "runtime": {"name", "version",
"provider", "xnnpack" (TFLite Interpreter: {"nodes", "partitions", "builtin"}, what this runtime's XNNPACK
took of the signature run; a signature past the file's first subgraph is loaded alone for it after the timed
runs, "xnnpack_note" saying so; null with "xnnpack_note" giving the reason where not measured)}, "latency_ms": {"n", "seconds", "p50", "p90", "p99", "mean", "std", "min", "max",
"ci95_median": [lo, hi], "ci_method", "raw": [...] (at most 10000), "raw_note" (when cut)},
"peak_rss_mb", "power": {...},
"inputs": [...], "outputs": {"inputs_sha256", "per_tensor_sample", "tensors": [{"name", "shape", "dtype", "size",
"sample", "argmax", "nonfinite"}]} (a digest of one more run's outputs, `agent/outputs.py`), "warnings": [...],
"fingerprint": {...}, "conditions": {...}}`. The host adds "output_check" (its own run's digest compared) before
it stores the result.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import EdgeqError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20          # any JSON body, request or response
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30   # one artifact file; the agent may lower it (--max-upload-mb)
MIN_TOKEN_CHARS = 16

MESSAGE_TYPES = frozenset({"submit"})
JOB_STATES = ("queued", "running", "done", "failed", "aborted")
FINAL_STATES = frozenset({"done", "failed", "aborted"})

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
RESERVED_NAMES = frozenset({"job.json", "progress.json", "result.json", "runner.log"})  # the agent's own

CONFIG_DEFAULTS: dict[str, Any] = {
    "runs": 50,
    "min_seconds": 1.0,
    "max_seconds": 60.0,
    "warmup_min": 5,
    "warmup_max": 200,
    "warmup_tolerance": 0.05,
    "threads": 1,
    "seed": 0,
    "dims": {},
    "timeout_s": None,
    "memory_mb": None,
    "power": True,
    "signature": None,
    "weight_cache": False,
}
SIGNATURE_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
DEFAULT_DIMS = {"batch": 1, "sequence": 64}
MAX_DIM = 1 << 20  # the largest size a job may give a symbolic input dim

NUMERIC_LIMITS = {
    "runs": (1, 1_000_000), "min_seconds": (0.0, 3600.0), "max_seconds": (0.001, 86400.0),
    "warmup_min": (0, 100_000), "warmup_max": (0, 1_000_000), "warmup_tolerance": (0.0, 10.0),
    "threads": (1, 1024), "seed": (0, 2**32 - 1), "timeout_s": (1.0, 86400.0),
    "memory_mb": (16, 1 << 24),
}


class ProtocolError(EdgeqError):
    """A message that breaks the protocol; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_message(body: bytes) -> dict:
    """Parse one JSON message and check its envelope (protocol version and known type)."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message: {len(body)} bytes is over the cap of {MAX_MESSAGE_BYTES}", 413)
    try:
        msg = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("message: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message: not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ProtocolError(f"message: a number it holds cannot be read ({str(exc)[:100]})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message: must be a JSON object")
    if msg.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol: {msg.get('protocol')!r} is not supported; this agent speaks {PROTOCOL_VERSION}")
    if msg.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"type: {msg.get('type')!r} is not one of: {', '.join(sorted(MESSAGE_TYPES))}")
    return msg


def _no_constant(name: str):
    raise ProtocolError(f"message: {name} is not a JSON number (a result holding it could never be sent)")


def encode_message(obj: dict) -> bytes:
    """Serialize a message; refuses to produce a body over the cap."""
    data = json.dumps(obj, sort_keys=True, allow_nan=False, default=_json_default).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message: {len(data)} bytes is over the cap of {MAX_MESSAGE_BYTES}", 413)
    return data


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _check_file_ref(ref: Any, field: str) -> dict:
    if not isinstance(ref, dict) or set(ref) != {"name", "sha256"}:
        raise ProtocolError(f"{field}: must be an object with exactly 'name' and 'sha256'")
    name, sha = ref["name"], ref["sha256"]
    if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ProtocolError(f"{field}.name: {name!r} must be a plain file name (letters, digits, _ . -)")
    if name in RESERVED_NAMES:
        raise ProtocolError(f"{field}.name: {name!r} is reserved for the agent's own files")
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise ProtocolError(f"{field}.sha256: {sha!r} is not a lowercase hex sha256")
    return {"name": name, "sha256": sha}


def check_config(config: Any) -> dict:
    """Validate a benchmark config and return it with defaults filled in."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ProtocolError("config: must be a JSON object")
    unknown = set(config) - set(CONFIG_DEFAULTS)
    if unknown:
        raise ProtocolError(f"config: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_DEFAULTS)}")
    out = dict(CONFIG_DEFAULTS)
    out.update(config)
    for key, (lo, hi) in NUMERIC_LIMITS.items():
        value = out[key]
        if value is None and CONFIG_DEFAULTS[key] is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ProtocolError(f"config.{key}: {value!r} must be a number in [{lo}, {hi}]")
        if isinstance(lo, int) and isinstance(hi, int) and not float(value).is_integer():
            raise ProtocolError(f"config.{key}: {value!r} must be an integer")
    for key in ("runs", "warmup_min", "warmup_max", "threads", "seed"):
        out[key] = int(out[key])
    dims = out["dims"]
    if not isinstance(dims, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM
            for k, v in dims.items()):
        raise ProtocolError(f"config.dims: must map dim names to integers in [1, {MAX_DIM}]")
    for key in ("power", "weight_cache"):
        if not isinstance(out[key], bool):
            raise ProtocolError(f"config.{key}: must be true or false")
    signature = out["signature"]
    if signature is not None and not (isinstance(signature, str) and SIGNATURE_RE.fullmatch(signature)):
        raise ProtocolError(f"config.signature: {out['signature']!r} must be null or match {SIGNATURE_RE.pattern}")
    return out


def check_submit(msg: dict) -> dict:
    """Validate a SUBMIT message (after `decode_message`); returns the normalised request."""
    allowed = {"protocol", "type", "job_id", "artifact", "files", "metadata", "config"}
    unknown = set(msg) - allowed
    if unknown:
        raise ProtocolError(f"submit: unknown keys {sorted(unknown)}")
    job_id = msg.get("job_id")
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise ProtocolError(f"job_id: {job_id!r} must match {JOB_ID_RE.pattern}")
    artifact = _check_file_ref(msg.get("artifact"), "artifact")
    if not artifact["name"].endswith((".onnx", ".tflite")):
        raise ProtocolError(f"artifact.name: {artifact['name']!r} must end with .onnx or .tflite")
    files = msg.get("files") or []
    if not isinstance(files, list) or len(files) > 64:
        raise ProtocolError("files: must be a list of at most 64 file references")
    files = [_check_file_ref(f, f"files[{i}]") for i, f in enumerate(files)]
    names = [artifact["name"]] + [f["name"] for f in files]
    if len(set(names)) != len(names):
        raise ProtocolError(f"files: names must be unique, got {names}")
    return {
        "job_id": job_id, "artifact": artifact, "files": files,
        "metadata": _check_metadata(msg.get("metadata")),
        "config": check_config(msg.get("config")),
    }


def _check_metadata(metadata) -> dict | None:
    """The FILE.json keys a job uses: `inputs` (checked where they are made), and `runtime_min` (runtime -> version
    text or null, plus a `note`) with the `sha256` and `variant` it was written for."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise ProtocolError("metadata: must be a JSON object or null")
    out = {"inputs": _check_inputs(metadata.get("inputs"))}
    sha, variant, need = metadata.get("sha256"), metadata.get("variant"), metadata.get("runtime_min")
    if need is not None:
        if not (isinstance(need, dict) and len(need) <= 16 and all(
                isinstance(k, str) and len(k) <= 64 and (v is None or isinstance(v, str) and len(v) <= 500)
                for k, v in need.items())):
            raise ProtocolError("metadata.runtime_min: must map at most 16 runtime names to version text or null")
        if not (isinstance(sha, str) and SHA256_RE.fullmatch(sha)):
            raise ProtocolError("metadata.sha256: runtime_min needs the sha256 (64 lowercase hex digits) it was written for")
        if variant is not None and not (isinstance(variant, str) and len(variant) <= 64):
            raise ProtocolError("metadata.variant: must be text of at most 64 characters")
        out.update(sha256=sha, variant=variant, runtime_min=need)
    return out


INPUT_DTYPES = frozenset({"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                          "float16", "float32", "float64"})
MAX_INPUTS = 1024
MAX_RANK = 16


def _finite(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and abs(value) < 2**63)


def _check_inputs(inputs) -> list[dict] | None:
    """metadata.inputs as `inputs.make_inputs` reads it (name, dtype, shape with symbolic dims as text, an integer
    input's `range`, `dim_defaults`, `role`), checked here so a bad one is a 400, never a job or a result that
    cannot be sent (a NaN range); other keys are dropped."""
    if inputs is None:
        return None
    if not isinstance(inputs, list) or len(inputs) > MAX_INPUTS:
        raise ProtocolError(f"metadata.inputs: must be a list of at most {MAX_INPUTS} objects")
    out = []
    for i, item in enumerate(inputs):
        field = f"metadata.inputs[{i}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{field}: must be an object with name, dtype and shape")
        name, dtype, shape = item.get("name"), item.get("dtype"), item.get("shape")
        if not (isinstance(name, str) and 0 < len(name) <= 256):
            raise ProtocolError(f"{field}.name: {str(name)[:80]!r} must be text of 1 to 256 characters")
        if dtype not in INPUT_DTYPES:
            raise ProtocolError(f"{field}.dtype: {str(dtype)[:80]!r} is not one of: {', '.join(sorted(INPUT_DTYPES))}")
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(
                d is None or isinstance(d, str) and 0 < len(d) <= 64
                or isinstance(d, int) and not isinstance(d, bool) and -1 <= d <= MAX_DIM for d in shape)):
            raise ProtocolError(f"{field}.shape: {str(shape)[:80]} must be a list of at most {MAX_RANK} dims, each a "
                                f"size in [1, {MAX_DIM}], -1, 0 or null (dynamic), or a symbolic name")
        clean = {"name": name, "dtype": dtype, "shape": list(shape)}
        value_range = item.get("range")
        if value_range is not None:
            if not (isinstance(value_range, list) and len(value_range) == 2 and all(map(_finite, value_range))
                    and value_range[0] <= value_range[1]):
                raise ProtocolError(f"{field}.range: {str(value_range)[:80]} must be [low, high], two finite numbers "
                                    "with low <= high")
            clean["range"] = value_range
        defaults = item.get("dim_defaults")
        if defaults is not None:
            if not (isinstance(defaults, dict) and len(defaults) <= 64 and all(
                    isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool)
                    and 1 <= v <= MAX_DIM for k, v in defaults.items())):
                raise ProtocolError(f"{field}.dim_defaults: must map dim names to integers in [1, {MAX_DIM}]")
            clean["dim_defaults"] = defaults
        role = item.get("role")
        if role is not None:
            if not (isinstance(role, str) and len(role) <= 64):
                raise ProtocolError(f"{field}.role: must be text of at most 64 characters")
            clean["role"] = role
        out.append(clean)
    return out


def request_fingerprint(request: dict) -> str:
    """A stable hash of what a job would do: same job id + different fingerprint -> refused."""
    import hashlib

    key = {k: request[k] for k in ("artifact", "files", "metadata", "config")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
