"""The host's client for one agent (stdlib `http.client` only; runs on the host, never on a board).

Every failure becomes an `AgentError` (an EdgeqError) whose message names the agent and says
what happened: refused, unreachable, too slow, lost mid-job, TLS mismatch, an answer that breaks the
protocol, or the agent's own refusal. Each request has an overall deadline (connect, headers and body
together), since a socket timeout alone lets an agent that trickles one byte at a time hold the host forever.
GETs and submits are retried briefly on transport errors, never after a timeout (that would multiply the
wait the message names): a submit is safe to repeat because job ids are idempotent.
Every answer is checked against the shape `protocol.py` promises before anyone reads it.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import ssl
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable

from ..errors import EdgeqError
from ..fileio import sha256_file
from . import protocol as P

MAX_RESULT_BYTES = 256 << 20  # a result (up to 10000 raw latencies, output samples) may exceed a message
MIN_RATE_BYTES_S = 256 << 10  # the slowest link a body is waited for: a request's deadline grows by its size at it
RESULT_STATUSES = ("valid", "invalid", "failed", "aborted")


class AgentError(EdgeqError):
    """A failed exchange with an agent; `status` is the HTTP status (None: transport failure)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def check_url(url: object, device: str | None = None) -> str:
    """`url` if it is http(s)://HOST[:PORT] with a port in 1..65535, else an EdgeqError naming the device."""
    who = f"device {device}: url" if device and device != url else "device url"
    shape = "must look like http://HOST:PORT or https://HOST:PORT"
    if not isinstance(url, str):
        raise EdgeqError(f"{who}: {url!r} is not text; it {shape}")
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError as exc:  # an unclosed [IPv6 bracket, a port that is not a number or out of range
        raise EdgeqError(f"{who}: {url!r} {shape} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise EdgeqError(f"{who}: {url!r} {shape}")
    if port == 0:
        raise EdgeqError(f"{who}: {url!r}: port 0 is not a port an agent listens on (1-65535)")
    return url


class _Deadline:
    """Shuts a connection's socket when its time is up, so a blocked read in http.client returns."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.seconds, self.expired = conn, seconds, False
        self._end = time.monotonic() + seconds
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="edgeq-deadline", daemon=True).start()

    def extend(self, seconds: float) -> None:
        self.seconds += seconds
        self._end += seconds

    def _watch(self) -> None:
        while not self._done.wait(min(max(self._end - time.monotonic(), 0.0), 0.5)):
            if time.monotonic() >= self._end:
                self.expired = True
                sock = self.conn.sock
                if sock is not None:
                    try:  # the plain socket's shutdown: SSLSocket's would drop the TLS object under a reader
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    def cancel(self) -> None:
        self._done.set()


class AgentClient:
    """Talk protocol v1 to the agent at `url` (http:// or https://) with a bearer token. `timeout` bounds each
    request as a whole (a body's transfer adds its size at MIN_RATE_BYTES_S)."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None,
                 timeout: float = 30.0, retries: int = 3):
        parsed = urllib.parse.urlsplit(check_url(url))
        self.url, self.token, self.timeout, self.retries = url.rstrip("/"), token, timeout, retries
        self._host, self._port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        self._ssl = None
        self._answered = False
        if parsed.scheme == "https":
            ctx = ssl.create_default_context(cafile=ca_file)
            if client_cert:
                ctx.load_cert_chain(client_cert, client_key)
            self._ssl = ctx

    def _connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        t = timeout or self.timeout
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=t, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=t)

    def _transport_error(self, exc: BaseException) -> AgentError:
        if isinstance(exc, ConnectionRefusedError):
            return AgentError(f"agent {self.url}: connection refused (is `edgeq agent serve` running there?)")
        if isinstance(exc, ssl.SSLError):
            return AgentError(f"agent {self.url}: TLS failed ({exc.reason or exc}); check the CA file, "
                              "client certificate, and that the agent serves https")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return AgentError(f"agent {self.url}: no answer within {self.timeout:g} s (network down or agent hung)")
        if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                            http.client.BadStatusLine, http.client.IncompleteRead)):
            # a plaintext request to a TLS agent is dropped at once: say so, unless we talked before
            hint = (" (if the agent requires TLS, use an https:// URL)"
                    if self._ssl is None and not self._answered else "")
            return AgentError(f"agent {self.url}: connection closed by the agent{hint}")
        return AgentError(f"agent {self.url}: {type(exc).__name__}: {exc}")

    def _request(self, method: str, path: str, body=None, headers: dict | None = None,
                 cap: int = P.MAX_MESSAGE_BYTES, length: int | None = None) -> tuple[int, dict]:
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if length is not None:
            hdrs["Content-Length"] = str(length)
        # GETs and job submits are idempotent (job ids are); a streamed upload is not replayable
        attempts = self.retries if method in ("GET", "POST") else 1
        for attempt in range(attempts):
            conn = self._connection()
            deadline = _Deadline(conn, self.timeout + (length or 0) / MIN_RATE_BYTES_S)
            try:
                try:
                    conn.request(method, path, body=body, headers=hdrs)
                except (BrokenPipeError, ConnectionResetError):
                    if deadline.expired:
                        raise
                    # the agent may refuse before reading the body; its answer follows
                resp = conn.getresponse()
                declared = resp.getheader("Content-Length")
                try:
                    size = int(declared)
                except (TypeError, ValueError):
                    raise AgentError(f"agent {self.url}: {method} {path}: answered without a byte count "
                                     f"(Content-Length {declared!r})") from None
                if size < 0 or size > cap:
                    raise AgentError(f"agent {self.url}: answer of {size} bytes refused (cap {cap})")
                deadline.extend(size / MIN_RATE_BYTES_S)
                data = resp.read(size)
                if len(data) != size:  # the agent died while answering
                    raise http.client.IncompleteRead(data, size - len(data))
                status = resp.status
                self._answered = True
                break
            except (AgentError, OSError, http.client.HTTPException) as exc:
                if deadline.expired:  # a shut socket ends the headers early too: no Content-Length, not the cause
                    raise AgentError(f"agent {self.url}: {method} {path}: no complete answer within "
                                     f"{round(deadline.seconds, 1):g} s (the agent answers too slowly, or hung)"
                                     ) from None
                if isinstance(exc, AgentError):
                    raise
                if attempt + 1 >= attempts or isinstance(exc, (socket.timeout, TimeoutError)):
                    raise self._transport_error(exc) from None
                time.sleep(0.3)
            finally:
                deadline.cancel()
                conn.close()
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AgentError(f"agent {self.url}: answered {status} with a body that is not JSON") from None
        if not isinstance(obj, dict):
            raise AgentError(f"agent {self.url}: {method} {path}: answered {status} with a JSON "
                             f"{type(obj).__name__}, not an object", status if status >= 400 else None)
        if status >= 400:
            raise AgentError(f"agent {self.url}: {status}: {obj.get('error', obj)}", status)
        return status, obj

    def info(self) -> dict:
        """The agent's INFO, checked: what `agent info` prints and `profile` holds a file's runtime_min against."""
        return self._checked("info", self._request("GET", "/v1/info")[1], INFO_FIELDS)

    def has_artifact(self, sha: str) -> bool:
        try:
            self._request("GET", f"/v1/artifacts/{sha}")
            return True
        except AgentError as exc:
            if exc.status == 404:
                return False
            raise

    def upload(self, path: str | os.PathLike, sha: str | None = None) -> str:
        """Upload a file pinned to its sha256 unless the agent already has it; returns the hash."""
        sha = sha or sha256_file(path)
        if self.has_artifact(sha):
            return sha
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            self._request("PUT", f"/v1/artifacts/{sha}", body=f, length=size,
                          headers={"Content-Type": "application/octet-stream"})
        return sha

    def submit(self, job_id: str, artifact: dict, files: list[dict], metadata: dict | None,
               config: dict) -> dict:
        """Submit a job (artifacts uploaded first); repeating the same call is harmless."""
        msg = {"protocol": P.PROTOCOL_VERSION, "type": "submit", "job_id": job_id,
               "artifact": artifact, "files": files, "metadata": metadata, "config": config}
        body = P.encode_message(msg)
        return self._request("POST", "/v1/jobs", body=body, length=len(body),
                             headers={"Content-Type": "application/json"})[1]

    def job(self, job_id: str) -> dict:
        return self._checked(f"job {job_id}", self._request("GET", f"/v1/jobs/{job_id}")[1], JOB_FIELDS)

    def result(self, job_id: str) -> dict:
        doc = self._request("GET", f"/v1/jobs/{job_id}/result", cap=MAX_RESULT_BYTES)[1]
        return self._checked(f"result of job {job_id}", doc, RESULT_FIELDS)

    def _checked(self, what: str, doc: dict, fields: dict) -> dict:
        problem = shape_problem(doc, fields)
        if problem:
            raise AgentError(f"agent {self.url}: {what}: {problem} (not what protocol {P.PROTOCOL_VERSION} promises)")
        return doc

    def wait(self, job_id: str, *, poll_s: float = 0.25, timeout_s: float = 3600.0,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is final and return its result; AgentError if the agent goes away."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                job = self.job(job_id)
            except AgentError as exc:
                if exc.status is None:
                    raise AgentError(f"{exc} while job {job_id} was in progress; its result, if any, "
                                     "was not stored") from None
                raise
            if on_progress:
                on_progress(job)
            if job["state"] in P.FINAL_STATES:
                return self.result(job_id)
            if time.monotonic() > deadline:
                raise AgentError(f"agent {self.url}: job {job_id} still {job['state']} after {timeout_s:g} s")
            time.sleep(poll_s)


# What each answer's fields must be (absent or null is allowed unless REQUIRED says otherwise): a kind from _KINDS,
# a tuple of allowed values, or a dict for a nested object. Only what the host reads is checked; more is kept.
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS: dict[str, Callable[[object], bool]] = {
    "a number": _number,
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "text": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
    "a list of text": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of numbers": lambda v: isinstance(v, list) and all(x is None or _number(x) for x in v),
    "a list of objects": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "an object of text": lambda v: isinstance(v, dict) and all(x is None or isinstance(x, str) for x in v.values()),
}
REQUIRED = "required"

INFO_FIELDS = {
    "protocol": (P.PROTOCOL_VERSION,), "version": "text", "power_reason": "text",
    "fingerprint": {"runtimes": "an object of text", "board": "text", "cpu_model": "text", "machine": "text",
                    "cpu_count": "an integer", "mem_total_mb": "a number", "os": "text", "kernel": "text",
                    "python": "text"},
    "power_meter": {"meter": "text", "scope": "text"},
    "max_upload_bytes": "an integer", "max_store_bytes": "an integer", "max_job_seconds": "a number",
    "max_memory_mb": "an integer", "sandbox": "text", "sandbox_reason": "text", REQUIRED: ("protocol",),
}
JOB_FIELDS = {"state": P.JOB_STATES, "progress": "an object", "error": "text", REQUIRED: ("state",)}
_TENSOR = {"name": "text", "shape": "a list of numbers", "sample": "a list of numbers", "argmax": "a list of numbers",
           "nonfinite": "an integer", REQUIRED: ("name", "shape", "sample")}
RESULT_FIELDS = {
    "status": RESULT_STATUSES, "state": P.JOB_STATES, "error": "text", "job_id": "text", "format": "text",
    "artifact_sha256": "text", "invalid_reasons": "a list of text", "warnings": "a list of text",
    "size_bytes": "a number", "load_ms": "a number", "first_inference_ms": "a number", "threads": "a number",
    "peak_rss_mb": "a number", "config": "an object", "fingerprint": "an object", "conditions": "an object",
    "warmup": "an object", "inputs": "a list of objects", "sandbox": "text",
    "latency_ms": {"n": "an integer", "seconds": "a number", "p50": "a number", "p90": "a number", "p99": "a number",
                   "mean": "a number", "std": "a number", "min": "a number", "max": "a number",
                   "ci95_median": "a list of numbers", "raw": "a list of numbers"},
    "runtime": {"name": "text", "version": "text", "provider": "text"},
    "power": {"mean_w": "a number", "energy_per_inference_mj": "a number", "energy_per_inference_net_mj": "a number",
              "reason": "text", "meter": "text"},
    "outputs": {"inputs_sha256": "text", "tensors": "a list of objects"},
    REQUIRED: ("status",),
}


def shape_problem(doc: dict, fields: dict, prefix: str = "") -> str | None:
    """What in `doc` breaks `fields` (the first such field, named with its value), or None."""
    for name, kind in fields.items():
        if name == REQUIRED:
            continue
        value, field = doc.get(name), f"{prefix}{name}"
        if value is None:
            if name in fields.get(REQUIRED, ()):
                return f"field {field!r} is missing"
            continue
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                return f"field {field!r} is {_show(value)}, not an object"
            problem = shape_problem(value, kind, f"{field}.")
            if problem:
                return problem
        elif isinstance(kind, tuple):
            if isinstance(value, bool) or value not in kind:
                return f"field {field!r} is {_show(value)}, not one of: {', '.join(map(str, kind))}"
        elif not _KINDS[kind](value):
            return f"field {field!r} is {_show(value)}, not {kind}"
    if fields is RESULT_FIELDS:
        ci = (doc.get("latency_ms") or {}).get("ci95_median")
        if ci is not None and len(ci) != 2:
            return f"field 'latency_ms.ci95_median' is {_show(ci)}, not a pair [lo, hi]"
        for i, t in enumerate((doc.get("outputs") or {}).get("tensors") or []):
            problem = shape_problem(t, _TENSOR, f"outputs.tensors[{i}].")
            if problem:
                return problem
    return None


def _show(value) -> str:
    text = json.dumps(value, default=str) if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
