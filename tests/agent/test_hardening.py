"""Denial of service, parser edge cases and job housekeeping, on real agents (a child process, or an AgentServer in
this process where a test needs a setting `edgeq agent serve` has no option for, e.g. a short header deadline)."""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import stat
import subprocess
import sys
import time

import pytest

from edgeq.agent.client import AgentError
from edgeq.agent.jobs import _runner_limits
from edgeq.agent.server import AgentServer

from .conftest import FAST, run_job


def client_of(server: AgentServer, **kw):
    from edgeq.agent.client import AgentClient

    return AgentClient(server.url, server.agent.cfg.token, **kw)


def address(agent) -> tuple[str, int]:
    host, port = agent.url.split("//")[1].rsplit(":", 1)
    return host, int(port)


def exchange(agent, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the agent closes the connection (or `timeout`): everything it answered."""
    sock = socket.create_connection(address(agent), timeout=timeout)
    try:
        sock.sendall(data)
        out = b""
        while True:
            try:
                block = sock.recv(65536)
            except socket.timeout:
                return out + b"<still open>"
            if not block:
                return out
            out += block
    finally:
        sock.close()


def answer(raw: bytes) -> tuple[int, dict]:
    """(status, JSON body) of the first HTTP answer in `raw`."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int([h.split(b":", 1)[1] for h in head.split(b"\r\n")[1:] if h.lower().startswith(b"content-length")][0])
    return status, json.loads(body[:length])


def request(agent, method: str, path: str, body: bytes = b"", headers: dict | None = None, token: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x"]
    if token:
        lines.append(f"Authorization: Bearer {agent.token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return exchange(agent, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def submit_bytes(job_id: str, sha: str, **extra) -> bytes:
    msg = {"protocol": 1, "type": "submit", "job_id": job_id, "artifact": {"name": "m.onnx", "sha256": sha},
           "config": FAST, **extra}
    return json.dumps(msg).encode()


# ----- finding 1: connections without the token cannot lock out the token holder
def test_idle_connections_without_token_do_not_lock_out_a_client(shared_agent):
    """80 connections that never send a byte (more than the agent serves at once): the host is still answered."""
    idle = [socket.create_connection(address(shared_agent)) for _ in range(80)]
    try:
        time.sleep(0.3)  # all accepted
        assert shared_agent.client(timeout=10, retries=1).info()["protocol"] == 1
    finally:
        for s in idle:
            s.close()


def test_request_headers_have_a_deadline_in_total_not_per_read(inproc):
    """A client trickling its headers a byte at a time, each within the per-read timeout, is closed once the
    whole-request deadline passes."""
    server = inproc(header_timeout_s=1.0)
    sock = socket.create_connection(address(server), timeout=10)
    sock.sendall(b"GET /v1/info HTTP/1.1\r\n")
    closed, end = False, time.monotonic() + 10
    while time.monotonic() < end and not closed:
        try:
            sock.sendall(b"X")
            sock.settimeout(0.2)
            closed = sock.recv(1024) == b""
        except socket.timeout:
            continue
        except OSError:
            closed = True
    sock.close()
    assert closed, "a connection trickling its headers was still open after 10 s with a 1 s header deadline"
    assert client_of(server).info()["protocol"] == 1


def test_authenticated_upload_slower_than_the_header_deadline_succeeds(inproc):
    """The header deadline does not cut an authenticated body: it has its own, proportional to its size."""
    server = inproc(header_timeout_s=1.0)
    data = b"slow upload " * 100
    sha = hashlib.sha256(data).hexdigest()
    sock = socket.create_connection(address(server), timeout=15)
    sock.sendall(f"PUT /v1/artifacts/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.agent.cfg.token}\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode())
    for i in range(3):  # 2.4 s of body, past the 1 s header deadline
        time.sleep(0.8)
        sock.sendall(data[i * 400:(i + 1) * 400])
    raw = b""
    while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
        block = sock.recv(65536)
        if not block:
            break
        raw += block
    sock.close()
    status, body = answer(raw)
    assert status == 201 and body["sha256"] == sha


# ----- finding 2: header size and count capped before the token is checked
def test_large_or_many_headers_refused_before_the_token(shared_agent):
    big = {f"X-Pad-{i}": "a" * 1000 for i in range(40)}
    status, body = answer(request(shared_agent, "GET", "/v1/info", headers=big, token=False))
    assert status == 431 and "request headers too large" in body["error"]
    many = {f"X-H-{i}": "1" for i in range(80)}
    status, body = answer(request(shared_agent, "GET", "/v1/info", headers=many, token=False))
    assert status == 431
    assert shared_agent.client().info()["protocol"] == 1


# ----- finding 3: every way a job ends removes its copy of the model
def test_timed_out_job_leaves_no_model_copy(shared_agent, tiny_onnx):
    client = shared_agent.client()
    result = run_job(client, tiny_onnx, {"runs": 1_000_000, "min_seconds": 3000, "max_seconds": 3600,
                                         "timeout_s": 1}, job_id="times-out")
    assert result["state"] == "failed" and "time limit" in result["error"]
    job_dir = shared_agent.data_dir / "jobs" / "times-out"
    assert sorted(p.name for p in job_dir.iterdir()) <= ["job.json", "progress.json", "runner.log"]
    assert client.has_artifact(result["artifact_sha256"])  # the stored file itself stays


# ----- finding 4: results and job records are bounded
def test_raw_latencies_capped_with_statistics_over_all_runs(shared_agent, tiny_onnx):
    result = run_job(shared_agent.client(), tiny_onnx, {"runs": 12_000, "min_seconds": 0.0, "max_seconds": 120})
    lat = result["latency_ms"]
    assert lat["n"] >= 12_000 and len(lat["raw"]) == 10_000
    assert "10000 of the" in lat["raw_note"]


def test_finished_jobs_pruned_past_the_retention(inproc, tiny_onnx):
    server = inproc(keep_jobs=1)
    client = client_of(server)
    run_job(client, tiny_onnx, job_id="old")
    run_job(client, tiny_onnx, job_id="new")
    deadline = time.monotonic() + 10
    while server.agent.journal.get("old") is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # pruned by the worker right after it commits "new"
    with pytest.raises(AgentError, match="404"):
        client.job("old")
    assert not (server.agent.data_dir / "jobs" / "old").exists()
    assert client.result("new")["status"] == "valid"


def test_job_not_started_without_free_disk(inproc, tiny_onnx):
    server = inproc()
    client = client_of(server)
    sha = client.upload(tiny_onnx)
    server.agent.cfg.min_free_bytes = 1 << 60  # the disk is full from here on
    client.submit("no-room", {"name": "tiny.onnx", "sha256": sha}, [], None, FAST)
    result = client.wait("no-room", poll_s=0.1, timeout_s=30)
    assert result["state"] == "failed" and "not started" in result["error"] and "--min-free-mb" in result["error"]


# ----- finding 5: metadata.inputs checked at submit
@pytest.mark.parametrize("item,field", [
    ({"name": "x", "dtype": "int64", "shape": [1], "range": [0, float("nan")]}, "NaN"),
    ({"name": "x", "dtype": "int64", "shape": [1], "range": ["a", "b"]}, "range"),
    ({"name": "x", "dtype": "object", "shape": [1]}, "dtype"),
    ({"name": "x", "dtype": "V1000000", "shape": [1000]}, "dtype"),
    ({"name": "x", "dtype": "float32", "shape": [-5]}, "shape"),
    ({"name": "x", "dtype": "float32", "shape": [1e300]}, "shape"),
    ("abc", "inputs[0]"),
])
def test_bad_metadata_inputs_refused_at_submit(shared_agent, tiny_onnx, item, field):
    sha = shared_agent.client().upload(tiny_onnx)
    body = submit_bytes(f"meta-{secrets.token_hex(4)}", sha, metadata={"inputs": [item]})
    status, reply = answer(request(shared_agent, "POST", "/v1/jobs", body, {
        "Content-Type": "application/json", "Content-Length": len(body)}))
    assert status == 400 and field in reply["error"], reply


# ----- finding 6: malformed numbers are 400, never 500
def test_malformed_lengths_and_json_are_400(shared_agent, tiny_onnx):
    status, reply = answer(request(shared_agent, "POST", "/v1/jobs", b"{}", {
        "Content-Type": "application/json", "Content-Length": "\u00b2"}))
    assert status == 400 and "Content-Length" in reply["error"]
    sha = shared_agent.client().upload(tiny_onnx)
    for body in (b"[" * 100_000 + b"]" * 100_000,
                 submit_bytes("digits", sha).replace(b'"runs": 10', b'"runs": ' + b"9" * 5000)):
        status, reply = answer(request(shared_agent, "POST", "/v1/jobs", body, {
            "Content-Type": "application/json", "Content-Length": len(body)}))
        assert status == 400, reply
    assert shared_agent.client().info()["protocol"] == 1


# ----- finding 7: names are matched in full
def test_trailing_newline_in_job_id_or_file_name_refused(shared_agent, tiny_onnx):
    client = shared_agent.client()
    sha = client.upload(tiny_onnx)
    with pytest.raises(AgentError, match="400: job_id"):
        client.submit("abc\n", {"name": "tiny.onnx", "sha256": sha}, [], None, FAST)
    with pytest.raises(AgentError, match="400: artifact.name"):
        client.submit("abc", {"name": "tiny.onnx\n", "sha256": sha}, [], None, FAST)
    assert not (shared_agent.data_dir / "jobs" / "abc\n").exists()


# ----- finding 8: failure messages say what happened
def test_memory_note_only_for_memory_errors():
    from edgeq.agent.jobs import memory_note

    assert memory_note("RuntimeError: AllocateTensors() called on inconsistent model", 512).endswith("model")
    assert memory_note("memory limit exceeded (MemoryError: )", 512).endswith("(memory limit 512 MB)")


def test_runner_without_result_reports_its_last_log_line(shared_agent, tiny_onnx):
    result = run_job(shared_agent.client(), tiny_onnx, {"memory_mb": 16})
    assert result["state"] == "failed"
    log = (shared_agent.data_dir / "jobs" / result["job_id"] / "runner.log").read_text().strip().splitlines()
    assert log and log[-1].strip()[:100] in result["error"]


# ----- finding 9: nothing after a request with a body is read as another request
def test_bytes_past_a_short_content_length_are_not_a_second_request(shared_agent):
    data = b"short"
    sha = hashlib.sha256(data).hexdigest()
    raw = request(shared_agent, "PUT", f"/v1/artifacts/{sha}", data + b"GARBAGE / HTTP/1.1\r\n\r\n",
                  {"Content-Length": len(data)})
    assert raw.count(b"HTTP/1.") == 1 and answer(raw)[0] == 201 and not raw.endswith(b"<still open>")
    raw = request(shared_agent, "GET", "/v1/info", b"GET /v1/info HTTP/1.1\r\n\r\n", {"Content-Length": 25})
    assert raw.count(b"HTTP/1.") == 1 and answer(raw)[0] == 200 and not raw.endswith(b"<still open>")


# ----- finding 10: the data directory is private
def test_data_directory_private(shared_agent, tiny_onnx):
    result = run_job(shared_agent.client(), tiny_onnx)
    data = shared_agent.data_dir
    for d in (data, data / "jobs", data / "artifacts", data / "jobs" / result["job_id"]):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in (data / "journal.sqlite", data / "artifacts" / result["artifact_sha256"],
              data / "jobs" / result["job_id"] / "runner.log"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


# ----- finding 11: the runner's file-size and open-file limits
def test_runner_limits_cap_file_size_and_open_files():
    code = "import resource as r; print(r.getrlimit(r.RLIMIT_NOFILE)[0], r.getrlimit(r.RLIMIT_FSIZE)[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=_runner_limits(2048, 60, 1 << 30)).stdout.split()
    assert int(out[0]) <= 256 and int(out[1]) == 1 << 30


# ----- finding 12: the agent's own JSON errors, never http.server's HTML
def test_unknown_method_and_garbage_get_json_errors(shared_agent):
    status, reply = answer(request(shared_agent, "PATCH", "/v1/info"))
    assert status == 501 and "PATCH" in reply["error"]
    status, reply = answer(exchange(shared_agent, b"GARBAGE\r\n\r\n"))
    assert status == 400 and reply["type"] == "error"
    assert shared_agent.client().info()["protocol"] == 1
