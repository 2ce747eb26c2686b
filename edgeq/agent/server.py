"""The agent's HTTP(S) server: authenticates, caps, stores artifacts and hands jobs to `jobs.py`.

The protocol and trust model are in `protocol.py`. This module never deserialises anything but
JSON, never reads a body before the token and the size cap are checked, and never runs a model in
its own process.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time

from ..errors import EdgeqError
from . import protocol as P
from .jobs import Agent, AgentConfig, read_token_file

__all__ = ["AgentConfig", "AgentServer", "READY_PREFIX", "read_token_file", "serve"]

READY_PREFIX = "EDGEQ_AGENT_LISTENING"
MAX_CONNECTIONS = 64     # concurrent connections; more are closed at once (no thread per flood)
_CHUNK = 1 << 20


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeq-agent"
    sys_version = ""

    @property
    def agent(self) -> Agent:
        return self.server.agent  # type: ignore[attr-defined]

    def setup(self):
        self.timeout = self.agent.cfg.request_timeout_s
        super().setup()

    def log_message(self, fmt, *args):  # one line per request on stderr, no bodies, no tokens
        sys.stderr.write(f"edgeq-agent {self.address_string()} {fmt % args}\n")

    def _send(self, status: int, obj: dict, close: bool = False) -> None:
        body = json.dumps(obj, sort_keys=True, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        # the body may be unread: never reuse this connection
        try:
            self._send(status, {"protocol": P.PROTOCOL_VERSION, "type": "error", "error": message}, close=True)
        except OSError:
            self.close_connection = True

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme != "Bearer" or not given:
            self._error(401, "missing bearer token (Authorization: Bearer <token>)")
            return False
        if not hmac.compare_digest(given.strip().encode(), self.agent.cfg.token.encode()):
            self._error(401, "wrong token")
            return False
        return True

    def _content_length(self, cap: int) -> int | None:
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "chunked bodies are not accepted; send Content-Length")
            return None
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.isdigit():
            self._error(411, "Content-Length is required")
            return None
        length = int(raw)
        if length > cap:
            self._error(413, f"body of {length} bytes is over the cap of {cap} bytes")
            return None
        return length

    def _dispatch(self, method: str) -> None:
        if not self._authorized():
            return
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        try:
            if parts[:1] != ["v1"]:
                raise P.ProtocolError(f"path: {self.path!r} is not part of protocol {P.PROTOCOL_VERSION}", 404)
            route = (method, *parts[1:2], len(parts))
            if route == ("GET", "info", 2):
                self._send(200, self.agent.info)
            elif route == ("GET", "artifacts", 3):
                self._get_artifact(parts[2])
            elif route == ("PUT", "artifacts", 3):
                self._put_artifact(parts[2])
            elif route == ("POST", "jobs", 2):
                self._post_job()
            elif route == ("GET", "jobs", 3):
                job = self.agent.journal.get(parts[2])
                if job is None:
                    raise P.ProtocolError(f"job_id: {parts[2]!r} is not known to this agent", 404)
                self._send(200, self.agent.view(job))
            elif route == ("GET", "jobs", 4) and parts[3] == "result":
                self._send(200, self.agent.result(parts[2]))
            else:
                raise P.ProtocolError(f"{method} {self.path} is not part of protocol {P.PROTOCOL_VERSION}", 404)
        except P.ProtocolError as exc:
            self._error(exc.status, str(exc))
        except EdgeqError as exc:
            self._error(400, str(exc))
        except (ConnectionError, socket.timeout):
            self.close_connection = True  # the peer went away; nothing to answer
        except Exception as exc:  # keep serving; say what broke without leaking internals
            sys.stderr.write(f"edgeq-agent: internal error on {method} {self.path}: {exc!r}\n")
            self._error(500, f"internal agent error ({type(exc).__name__})")

    def _get_artifact(self, sha: str) -> None:
        path = self.agent.artifact_path(sha)
        if not P.SHA256_RE.match(sha) or not path.is_file():
            raise P.ProtocolError(f"artifact {sha[:64]!r} is not stored here", 404)
        self.agent.artifacts.touch(sha)  # a host about to use it: not evicted before its job is submitted
        self._send(200, {"protocol": P.PROTOCOL_VERSION, "type": "artifact", "sha256": sha,
                         "size": path.stat().st_size})

    def _put_artifact(self, sha: str) -> None:
        if not P.SHA256_RE.match(sha):
            raise P.ProtocolError("artifact path must be /v1/artifacts/<lowercase hex sha256>")
        length = self._content_length(self.agent.cfg.max_upload_bytes)
        if length is None:
            return
        tmp = self.agent.artifacts.root / f".upload-{sha}-{threading.get_ident()}-{time.monotonic_ns()}"
        digest, remaining = hashlib.sha256(), length
        try:
            with self.agent.artifacts.reserve(length), open(tmp, "wb") as f:
                while remaining:
                    block = self.rfile.read(min(_CHUNK, remaining))
                    if not block:
                        raise P.ProtocolError(f"upload ended after {length - remaining} of {length} bytes")
                    digest.update(block)
                    f.write(block)
                    remaining -= len(block)
                f.flush()
                os.fsync(f.fileno())
                if digest.hexdigest() != sha:
                    raise P.ProtocolError(f"upload hashes to {digest.hexdigest()}, not the pinned {sha}; discarded")
                os.replace(tmp, self.agent.artifact_path(sha))
        except (OSError, socket.timeout) as exc:
            raise P.ProtocolError(f"upload failed: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._send(201, {"protocol": P.PROTOCOL_VERSION, "type": "artifact", "sha256": sha, "size": length})

    def _post_job(self) -> None:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype != "application/json":
            self._error(415, f"Content-Type {ctype!r} is refused; messages are application/json only")
            return
        length = self._content_length(P.MAX_MESSAGE_BYTES)
        if length is None:
            return
        msg = P.decode_message(self.rfile.read(length))
        status, job = self.agent.submit(P.check_submit(msg))
        self._send(status, job)

    def do_GET(self):
        self._dispatch("GET")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")


class AgentServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with an Agent and optional TLS done in the handler thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog; the default 5 drops bursts of clients

    def __init__(self, cfg: AgentConfig):
        self.agent = Agent(cfg)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.ssl_context = None
        if cfg.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
            if cfg.client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(str(cfg.client_ca))
            self.ssl_context = ctx
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.address_family = family
        super().__init__((cfg.host, cfg.port), _Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address):
        request.settimeout(self.agent.cfg.request_timeout_s)
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                sys.stderr.write(f"edgeq-agent {client_address[0]} TLS handshake refused: {exc}\n")
                return
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def server_close(self):
        super().server_close()
        self.agent.stop()


def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT; prints `EDGEQ_AGENT_LISTENING <url>` when ready."""
    server = AgentServer(cfg)
    if server.agent.recovered:
        sys.stderr.write(f"edgeq-agent: {server.agent.recovered} unfinished job(s) from a previous run marked aborted\n")
    if server.ssl_context is None and cfg.host not in ("127.0.0.1", "::1", "localhost"):
        sys.stderr.write("edgeq-agent: WARNING: serving without TLS on a non-loopback address; "
                         "the token travels in clear text\n")

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{READY_PREFIX} {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
