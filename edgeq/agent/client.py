"""The host's client for one agent (stdlib `http.client` only; runs on the host, never on a board).

Every failure becomes an `AgentError` (an EdgeqError) whose message names the agent and says
what happened: refused, unreachable, lost mid-job, TLS mismatch, or the agent's own refusal.
GETs and submits are retried briefly on transport errors: a submit is safe to repeat because
job ids are idempotent.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Callable

from ..errors import EdgeqError
from ..fileio import sha256_file
from . import protocol as P

MAX_RESULT_BYTES = 256 << 20  # a result keeps every raw latency, so it may exceed a message


class AgentError(EdgeqError):
    """A failed exchange with an agent; `status` is the HTTP status (None: transport failure)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AgentClient:
    """Talk protocol v1 to the agent at `url` (http:// or https://) with a bearer token."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None,
                 timeout: float = 30.0, retries: int = 3):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise EdgeqError(f"device url: {url!r} must look like http://HOST:PORT or https://HOST:PORT")
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
            try:
                try:
                    conn.request(method, path, body=body, headers=hdrs)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent may refuse before reading the body; its answer follows
                resp = conn.getresponse()
                size = int(resp.getheader("Content-Length") or -1)
                if size < 0 or size > cap:
                    raise AgentError(f"agent {self.url}: answer of {size} bytes refused (cap {cap})")
                data = resp.read(size)
                if len(data) != size:  # the agent died while answering
                    raise http.client.IncompleteRead(data, size - len(data))
                status = resp.status
                self._answered = True
                break
            except AgentError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                if attempt + 1 >= attempts:
                    raise self._transport_error(exc) from None
                time.sleep(0.3)
            finally:
                conn.close()
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AgentError(f"agent {self.url}: answered {status} with a body that is not JSON") from None
        if status >= 400:
            raise AgentError(f"agent {self.url}: {status}: {obj.get('error', obj)}", status)
        return status, obj

    def info(self) -> dict:
        return self._request("GET", "/v1/info")[1]

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
        return self._request("GET", f"/v1/jobs/{job_id}")[1]

    def result(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/result", cap=MAX_RESULT_BYTES)[1]

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
