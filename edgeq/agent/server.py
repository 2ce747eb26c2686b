"""The agent's HTTP(S) server: authenticates, caps, stores artifacts and hands jobs to `jobs.py`.

The protocol and trust model are in `protocol.py`. This module never deserialises anything but
JSON, never reads a body before the token and the size cap are checked, and never runs a model in
its own process.

Connections are budgeted so that nobody without the token can keep a token holder out: a connection
that has not yet presented a valid token is *pending*; at most `MAX_PENDING` are, and a new one
closes the oldest pending one when they are all taken. A pending connection must complete its TLS
handshake, request line and headers (at most `MAX_HEADER_BYTES` in `MAX_HEADER_LINES` lines) within
`AgentConfig.header_timeout_s` in all, not per read; a body must arrive within `BODY_FLOOR_S` or at
`BODY_MIN_RATE`, whichever allows longer. Authenticated connections have their own budget of
`MAX_CONNECTIONS`. The server's loop enforces the deadlines by shutting the socket down (`_reap`).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
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
MAX_CONNECTIONS = 64     # authenticated connections at once; one more is answered 503
MAX_PENDING = 32         # connections without a valid token yet; a new one closes the oldest past it
MAX_HEADER_BYTES = 32 << 10  # request line and headers, read before the token is checked
MAX_HEADER_LINES = 64
BODY_FLOOR_S = 30.0      # a body may always take this long ...
BODY_MIN_RATE = 128 << 10  # ... or as long as it takes at this many bytes a second (1 GiB: 2.3 hours)
_CHUNK = 1 << 20


class _Conn:
    """One accepted connection as the server's budget sees it: pending (no valid token yet) or authenticated."""

    def __init__(self, sock: socket.socket, header_timeout_s: float):
        self.ctl = sock.dup()  # shutdown(2) through a duplicate reaches the connection whatever wraps `sock` (TLS)
        self.opened = time.monotonic()
        self.deadline: float | None = self.opened + header_timeout_s
        self.authenticated = False
        self.cut = False

    def shut(self) -> None:
        self.cut = True
        try:
            self.ctl.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns at once
        except OSError:
            pass


class _HeaderBudget:
    """What `http.client.parse_headers` reads through: at most `size` bytes and `lines` lines in all, so a
    client without the token cannot make the agent hold 100 headers of 64 KiB each."""

    def __init__(self, rfile, size: int, lines: int):
        self.rfile, self.left, self.lines = rfile, size, lines

    def readline(self, limit: int = -1) -> bytes:
        if self.lines <= 0:
            raise http.client.HTTPException(f"more than {MAX_HEADER_LINES} header lines")
        self.lines -= 1
        line = self.rfile.readline(max(self.left, 0) + 1)
        self.left -= len(line)
        if self.left < 0:
            raise http.client.LineTooLong("headers")
        return line


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeq-agent"
    sys_version = ""

    @property
    def agent(self) -> Agent:
        return self.server.agent  # type: ignore[attr-defined]

    @property
    def _conn(self) -> _Conn | None:
        return getattr(self.server._local, "conn", None)  # type: ignore[attr-defined]

    def setup(self):
        self.timeout = self.agent.cfg.request_timeout_s  # per read; the server's deadlines bound the total
        super().setup()

    def parse_request(self) -> bool:
        real = self.rfile
        self.rfile = _HeaderBudget(real, MAX_HEADER_BYTES - len(self.raw_requestline), MAX_HEADER_LINES + 1)
        try:
            return super().parse_request()
        finally:
            self.rfile = real

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a garbled request line, headers over the budget, an unknown method) in the
        agent's JSON error format, never its HTML page."""
        if code == 431:
            text = (f"request headers too large: at most {MAX_HEADER_BYTES} bytes in {MAX_HEADER_LINES} lines are "
                    "read before the token is checked")
        elif code == 501:
            text = f"method {self.command!r} is not part of protocol {P.PROTOCOL_VERSION} (GET, PUT, POST)"
        else:
            text = message or self.responses.get(code, ("error",))[0]
        self.log_error("code %d, message %s", code, text[:300])
        if not str(self.request_version).startswith("HTTP/1."):
            self.request_version = self.protocol_version  # a status line and headers, even for garbage
        self._error(code, text[:300])

    def log_message(self, fmt, *args):  # one line per request on stderr, no bodies, no tokens
        sys.stderr.write(f"edgeq-agent {self.address_string()} {fmt % args}\n")

    def _send(self, status: int, obj: dict, close: bool = False) -> None:
        body = json.dumps(obj, sort_keys=True, allow_nan=False).encode()
        headers = getattr(self, "headers", None)
        if (self.command != "GET" or headers is None or "Content-Length" in headers
                or "Transfer-Encoding" in headers):
            # nothing follows a request that carried a body: bytes past a short Content-Length (or a GET's body)
            # are never read as a second request (hosts open a connection per request anyway)
            close = True
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
        if not self.server.authenticate(self._conn):  # type: ignore[attr-defined]
            self._error(503, f"the agent is serving {MAX_CONNECTIONS} authenticated connections; retry shortly")
            return False
        return True

    def _content_length(self, cap: int) -> int | None:
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "chunked bodies are not accepted; send Content-Length")
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._error(411, "Content-Length is required")
            return None
        if not (raw.isascii() and raw.isdigit()):  # str.isdigit() alone takes '²'
            self._error(400, f"Content-Length: {raw[:40]!r} is not a decimal number of bytes")
            return None
        digits = raw.lstrip("0") or "0"
        if len(digits) > 18:  # past any cap; int() of thousands of digits raises
            self._error(413, f"body of {len(digits)} digits of bytes is over the cap of {cap} bytes")
            return None
        length = int(digits)
        if length > cap:
            self._error(413, f"body of {length} bytes is over the cap of {cap} bytes")
            return None
        self.server.expect_body(self._conn, length)  # type: ignore[attr-defined]
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
        finally:
            self.server.pending(self._conn)  # type: ignore[attr-defined]  # a next request on it proves itself again

    def _get_artifact(self, sha: str) -> None:
        path = self.agent.artifact_path(sha)
        if not P.SHA256_RE.fullmatch(sha) or not path.is_file():
            raise P.ProtocolError(f"artifact {sha[:64]!r} is not stored here", 404)
        self.agent.artifacts.touch(sha)  # a host about to use it: not evicted before its job is submitted
        self._send(200, {"protocol": P.PROTOCOL_VERSION, "type": "artifact", "sha256": sha,
                         "size": path.stat().st_size})

    def _put_artifact(self, sha: str) -> None:
        if not P.SHA256_RE.fullmatch(sha):
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
                self.server.body_read(self._conn)  # type: ignore[attr-defined]
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
        body = self.rfile.read(length)
        self.server.body_read(self._conn)  # type: ignore[attr-defined]
        msg = P.decode_message(body)
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
        self._conns: dict[socket.socket, _Conn] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # the handler thread's own _Conn
        self._dropped, self._dropped_logged = 0, time.monotonic()
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

    # ----- the connection budget (module docstring); every _Conn is changed under self._lock
    def process_request(self, request, client_address):
        with self._lock:
            self._reap()
            pending = [c for c in self._conns.values() if not c.authenticated and not c.cut]
            if len(pending) >= MAX_PENDING:  # the newest is the likeliest to send its request at once
                min(pending, key=lambda c: c.opened).shut()
                self._dropped += 1
            if len(self._conns) >= 2 * MAX_PENDING + MAX_CONNECTIONS:  # cut ones not gone yet: no thread per flood
                self.shutdown_request(request)
                self._dropped += 1
                return
            self._conns[request] = _Conn(request, self.agent.cfg.header_timeout_s)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address):
        self._local.conn = self._conns.get(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        with self._lock:
            conn = self._conns.pop(request, None)
        if conn is not None:
            conn.ctl.close()

    def _reap(self) -> None:
        now = time.monotonic()
        for conn in self._conns.values():
            deadline = conn.deadline
            if not conn.cut and deadline is not None and now > deadline:
                conn.shut()
                self._dropped += 1

    def service_actions(self):
        """Between accepts (every poll interval): close connections past their deadline; say so once a minute."""
        with self._lock:
            self._reap()
            dropped, now = self._dropped, time.monotonic()
            if dropped and now - self._dropped_logged > 60:
                self._dropped, self._dropped_logged = 0, now
            else:
                dropped = 0
        if dropped:
            sys.stderr.write(f"edgeq-agent: closed {dropped} connection(s) that sent no complete request in time or "
                             f"waited without a token while {MAX_PENDING} others did\n")

    def authenticate(self, conn: _Conn | None) -> bool:
        """A pending connection presented the token: False when the authenticated budget is full."""
        if conn is None:
            return True
        with self._lock:
            if not conn.authenticated:
                if sum(c.authenticated for c in self._conns.values()) >= MAX_CONNECTIONS:
                    return False
                conn.authenticated = True
            conn.deadline = None
        return True

    def expect_body(self, conn: _Conn | None, length: int) -> None:
        if conn is not None:
            with self._lock:
                conn.deadline = time.monotonic() + max(BODY_FLOOR_S, length / BODY_MIN_RATE)

    def body_read(self, conn: _Conn | None) -> None:
        if conn is not None:
            with self._lock:
                conn.deadline = None

    def pending(self, conn: _Conn | None) -> None:
        """Back to waiting for a request (keep-alive): pending again, with a fresh header deadline."""
        if conn is not None:
            with self._lock:
                conn.authenticated, conn.opened = False, time.monotonic()
                conn.deadline = conn.opened + self.agent.cfg.header_timeout_s

    def finish_request(self, request, client_address):
        request.settimeout(self.agent.cfg.request_timeout_s)
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                sys.stderr.write(f"edgeq-agent {client_address[0]} TLS handshake refused: {exc}\n")
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # a peer gone, or a connection this server cut: no traceback
            return
        super().handle_error(request, client_address)

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
    os.umask(0o077)  # the journal, stored models, results and logs are the agent user's alone
    server = AgentServer(cfg)
    if server.agent.recovered:
        sys.stderr.write(f"edgeq-agent: {server.agent.recovered} unfinished job(s) from a previous run marked aborted\n")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        sys.stderr.write("edgeq-agent: WARNING: running as root; the models it runs get root's files and devices "
                         "(run it as its own user, as the board installers do)\n")
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
