"""Host side against boards that misbehave: a fake board on 127.0.0.1 (port 0) that trickles, hangs or answers what
protocol v1 does not promise; bad device URLs; `agent serve` options that cannot work; files refused before a run."""

from __future__ import annotations

import json
import os
import secrets
import socket
import socketserver
import threading
import time
from pathlib import Path

import pytest

from edgeq import store
from edgeq.agent import host
from edgeq.agent.client import AgentClient, AgentError
from edgeq.agent.protocol import check_config
from edgeq.cli.main import main

GOOD_INFO = {"protocol": 1, "type": "info", "agent": "edgeq", "version": "0",
             "fingerprint": {"python": "3", "runtimes": {"onnxruntime": "1.20.0"}}, "power_meter": None,
             "power_reason": "none", "max_upload_bytes": 1 << 30, "max_job_seconds": 900.0, "max_memory_mb": 1024}
GOOD_RESULT = {"protocol": 1, "type": "result", "state": "done", "status": "valid", "error": None, "format": "onnx",
               "latency_ms": {"n": 3, "p50": 1.0, "p90": 1.1, "p99": 1.2, "mean": 1.0, "std": 0.1, "min": 0.9,
                              "max": 1.2, "ci95_median": [0.95, 1.05], "raw": [0.9, 1.0, 1.2]},
               "runtime": {"name": "onnxruntime", "version": "1.20.0", "provider": "CPUExecutionProvider"},
               "fingerprint": {"python": "3"}, "config": {"dims": {}}, "warnings": [], "invalid_reasons": []}


def reply(status: int, body, headers: str | None = None) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = headers if headers is not None else f"Content-Length: {len(data)}\r\n"
    return f"HTTP/1.1 {status} X\r\n{head}Connection: close\r\n\r\n".encode() + data


class FakeBoard(socketserver.ThreadingTCPServer):
    """A board that answers each request with `answer(method, path)`: bytes to send, or a callable given the socket
    (to trickle or hang until the test ends). Defaults answer as a well-behaved agent would; `requests` lists what
    it was asked."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answers: dict[str, object] | None = None):
        self.answers = {"info": reply(200, GOOD_INFO), "artifact": reply(200, {}), "submit": reply(201, {}),
                        "job": reply(200, {"state": "done"}), "result": reply(200, GOOD_RESULT), **(answers or {})}
        self.requests: list[str] = []
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def route(self, method: str, path: str) -> str:
        if path == "/v1/info":
            return "info"
        if path.startswith("/v1/artifacts/"):
            return "artifact"
        if method == "POST":
            return "submit"
        return "result" if path.endswith("/result") else "job"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _FakeHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock, board = self.request, self.server
        sock.settimeout(10)
        f = sock.makefile("rb")
        try:
            method, path, _ = f.readline().decode("latin-1").split(" ", 2)
            length = 0
            while (line := f.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            f.read(length)
        except (OSError, ValueError):
            return
        board.requests.append(f"{method} {path}")
        answer = board.answers[board.route(method, path)]
        try:
            answer(sock, board.stopping) if callable(answer) else sock.sendall(answer)
        except OSError:
            pass


def trickle(head: bytes, drip: bytes):
    """Send `head`, then `drip` every 0.2 s for up to 20 s: never silent long enough for a socket timeout."""
    def send(sock, stopping):
        sock.sendall(head)
        end = time.monotonic() + 20
        while time.monotonic() < end and not stopping.wait(0.2):
            sock.sendall(drip)
    return send


def hang(sock, stopping):
    stopping.wait(30)


@pytest.fixture
def fake_board():
    boards: list[FakeBoard] = []

    def make(**answers) -> FakeBoard:
        boards.append(FakeBoard(answers))
        return boards[-1]

    yield make
    for b in boards:
        b.stop()


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(secrets.token_urlsafe(24))
    os.chmod(path, 0o600)
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("answer", [
    trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b" "),  # the body, a byte at a time
    trickle(b"HTTP/1.1 200 OK\r\n", b"X-A: b\r\n"),                     # the headers, a line at a time
], ids=["body", "headers"])
def test_a_trickling_agent_is_given_up_at_the_request_deadline(fake_board, answer):
    """A socket timeout alone never fires on an agent that sends a byte every 0.2 s: the request's overall deadline
    (connect, headers and body) ends it, in one line that names the agent and the request."""
    board = fake_board(info=answer)
    t = time.monotonic()
    with pytest.raises(AgentError) as err:
        AgentClient(board.url, "t" * 20, timeout=1.0).info()
    assert time.monotonic() - t < 10  # the fake trickles for 20 s: a client without a deadline waits them out
    assert str(err.value) == (f"agent {board.url}: GET /v1/info: no complete answer within 1 s (the agent answers "
                              "too slowly, or hung)")


def test_a_hung_agent_is_not_asked_again_after_its_timeout(fake_board):
    """Retrying a request that timed out would make the wait three times the 'no answer within N s' it reports."""
    board = fake_board(info=hang)
    with pytest.raises(AgentError, match="within 1 s"):
        AgentClient(board.url, "t" * 20, timeout=1.0, retries=3).info()
    assert board.requests == ["GET /v1/info"]


@pytest.mark.parametrize("call,answers,message", [
    ("info", {"info": reply(200, b"{}", "Content-Length: abc\r\n")}, "answered without a byte count (Content-Length 'abc')"),
    ("info", {"info": reply(400, [1, 2, 3])}, "answered 400 with a JSON list, not an object"),
    ("info", {"info": reply(200, [1, 2, 3])}, "answered 200 with a JSON list, not an object"),
    ("info", {"info": reply(200, {"protocol": 1, "fingerprint": "x"})}, "info: field 'fingerprint' is \"x\", not an object"),
    ("info", {"info": reply(200, {"protocol": 1, "fingerprint": {"runtimes": [1]}})},
     "info: field 'fingerprint.runtimes' is [1], not an object of text"),
    ("info", {"info": reply(200, {"protocol": 2})}, "info: field 'protocol' is 2, not one of: 1"),
    ("job", {"job": reply(200, {"state": 5})}, "job j1: field 'state' is 5, not one of: queued"),
    ("job", {"job": reply(200, {})}, "job j1: field 'state' is missing"),
    ("result", {"result": reply(200, {"status": "valid", "latency_ms": "garbage"})},
     "result of job j1: field 'latency_ms' is \"garbage\", not an object"),
    ("result", {"result": reply(200, {"status": "valid", "latency_ms": {"p50": "1"}})},
     "result of job j1: field 'latency_ms.p50' is \"1\", not a number"),
    ("result", {"result": reply(200, {"status": "fine"})}, "result of job j1: field 'status' is \"fine\", not one of: valid"),
    ("result", {"result": reply(200, {"status": "valid", "outputs": {"tensors": [{"name": 3}]}})},
     "result of job j1: field 'outputs.tensors[0].name' is 3, not text"),
])
def test_an_answer_the_protocol_does_not_promise_is_a_one_line_error(fake_board, call, answers, message):
    board = fake_board(**answers)
    client = AgentClient(board.url, "t" * 20, timeout=5.0)
    with pytest.raises(AgentError) as err:
        client.info() if call == "info" else getattr(client, call)("j1")
    assert str(err.value).startswith(f"agent {board.url}: ") and message in str(err.value), str(err.value)


def test_agent_info_prints_a_malformed_answer_as_the_boards_error(fake_board, token_file, capsys):
    board = fake_board(info=reply(200, [1, 2, 3]))
    code, out, err = cli(capsys, "agent", "info", "--device", board.url, "--token-file", token_file)
    assert code == 1 and err == ""
    assert out.strip() == (f"{board.url}: error: agent {board.url}: GET /v1/info: answered 200 with a JSON list, "
                           "not an object")


def test_a_bad_result_from_one_board_fails_its_row_and_the_others_are_stored(fake_board, tiny_onnx, tmp_path,
                                                                               token_file):
    """Before, the bad board's result reached the store, whose AttributeError ended the whole run in the thread pool
    and stored nothing, the good board's result included."""
    good = fake_board()
    bad = fake_board(result=reply(200, {**GOOD_RESULT, "latency_ms": "garbage"}))
    devices = [host.Device("good", good.url, str(token_file)), host.Device("bad", bad.url, str(token_file))]
    db = tmp_path / "r.sqlite"
    summaries = host.profile([tiny_onnx], devices, check_config({"runs": 1}), str(db), check_outputs=False)
    by_device = {s["device"]: s for s in summaries}
    assert by_device["good"]["status"] == "valid" and by_device["good"]["row_id"]
    assert by_device["bad"]["status"] == "error" and by_device["bad"]["row_id"] is None
    assert "field 'latency_ms' is \"garbage\"" in by_device["bad"]["error"]
    assert [r.device for r in store.list_results(db)] == ["good"]


@pytest.mark.parametrize("url,message", [
    ("http://127.0.0.1:99999", "device url: 'http://127.0.0.1:99999' must look like http://HOST:PORT"),
    ("http://[::1", "device url: 'http://[::1' must look like http://HOST:PORT"),
    ("http://127.0.0.1:0", "port 0 is not a port an agent listens on"),
])
@pytest.mark.parametrize("command", ["agent info", "profile"])
def test_a_bad_device_url_is_one_line(url, message, command, capsys, token_file, tiny_onnx):
    args = ["agent", "info"] if command == "agent info" else ["profile", tiny_onnx]
    code, out, err = cli(capsys, *args, "--device", url, "--token-file", token_file)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("edgeq: error: ") and message in err, err


def test_a_devices_file_url_that_is_not_text_names_the_device(tmp_path, capsys, token_file):
    devices = tmp_path / "devices.toml"
    devices.write_text("[devices.pi5]\nurl = 5\n")
    code, _, err = cli(capsys, "agent", "info", "--device", "pi5", "--devices-file", devices,
                       "--token-file", token_file)
    assert code == 2 and err.strip() == f"edgeq: error: devices file: {devices}: device 'pi5': url = 5 must be a string"


@pytest.fixture
def serve_args(tmp_path, token_file, monkeypatch):
    """`agent serve` arguments whose checks pass; the server itself is replaced, so a command that passes its checks
    returns at once instead of serving."""
    from edgeq.agent import server

    monkeypatch.setattr(server, "serve", lambda cfg: None)
    return ["agent", "serve", "--token-file", token_file, "--data-dir", tmp_path / "data", "--port", "0",
            "--power-meter", "none"]


@pytest.mark.parametrize("option", ["--max-upload-mb", "--max-store-gb", "--max-job-seconds", "--keep-job-days"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_serve_refuses_a_number_that_is_not_finite(serve_args, option, value, capsys):
    code, _, err = cli(capsys, *serve_args, option, value)
    assert code == 2 and f"Invalid value for '{option}': '{value}' must be a finite number above 0" in err, err
    assert len(err.strip().splitlines()) == 1


def test_serve_takes_the_job_retention(serve_args, monkeypatch, capsys):
    from edgeq.agent import server

    seen = []
    monkeypatch.setattr(server, "serve", seen.append)
    assert cli(capsys, *serve_args, "--keep-jobs", "5", "--keep-job-days", "0.5")[0] == 0
    assert (seen[0].keep_jobs, seen[0].keep_job_days) == (5, 0.5)
    code, _, err = cli(capsys, *serve_args, "--keep-jobs", "0")
    assert code == 2 and "Invalid value for '--keep-jobs'" in err, err


def test_serve_refuses_what_it_could_not_serve_with_before_it_starts(serve_args, tmp_path, capsys):
    assert cli(capsys, *serve_args)[0] == 0  # the arguments the cases below spoil are good
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    code, _, err = cli(capsys, *serve_args, "--host", "999.1.1.1")
    assert code == 2 and err.startswith("edgeq: error: --host 999.1.1.1: not an address or a name that resolves"), err
    code, _, err = cli(capsys, *serve_args, "--tls-cert", garbage, "--tls-key", garbage)
    assert code == 2 and err.startswith(f"edgeq: error: --tls-cert {garbage} / --tls-key {garbage}: do not load"), err
    under_a_file = tmp_path / "file" / "data"
    under_a_file.parent.write_text("")
    code, _, err = cli(capsys, *serve_args, "--data-dir", under_a_file)
    assert code == 2 and err.startswith(f"edgeq: error: --data-dir {under_a_file}: cannot be written"), err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli(capsys, *serve_args, "--port", port)
    assert code == 2 and err.startswith(f"edgeq: error: --port {port}: already in use on 127.0.0.1"), err


def _bad_tflites(tmp_path: Path, tiny_tflite: Path, tiny_onnx: Path) -> dict[str, Path]:
    data = tiny_tflite.read_bytes()
    files = {"random": os.urandom(4096), "truncated": data[: len(data) // 3], "renamed-onnx": tiny_onnx.read_bytes()}
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.tflite"
        out[name].write_bytes(content)
    return out


@pytest.mark.parametrize("case", ["random", "truncated", "renamed-onnx"])
def test_a_tflite_file_that_does_not_load_is_refused_before_anything_is_sent(case, fake_board, tmp_path, capsys,
                                                                            token_file, tiny_tflite, tiny_onnx):
    """As an unreadable ONNX file is: exit 2 in one line, nothing uploaded, nothing stored."""
    pytest.importorskip("ai_edge_litert")
    path = _bad_tflites(tmp_path, tiny_tflite, tiny_onnx)[case]
    board, db = fake_board(), tmp_path / "r.sqlite"
    code, _, err = cli(capsys, "profile", path, "--device", board.url, "--token-file", token_file, "--db", db)
    assert code == 2 and err.startswith(f"edgeq: error: artifact: {path} is not a TFLite model"), err
    assert board.requests == [] and store.list_results(db) == []


def test_a_signature_the_tflite_file_lacks_is_refused_listing_its_own(fake_board, tmp_path, capsys, token_file,
                                                                      two_signature_tflite, tiny_tflite):
    """Without a FILE.json to list them, the file's own signatures (as this host's LiteRT reads them) decide."""
    pytest.importorskip("ai_edge_litert")
    board, db = fake_board(), tmp_path / "r.sqlite"
    for path, signature, has in ((two_signature_tflite, "bogus", "decode, serving_default"),
                                 (tiny_tflite, "decode", "serving_default")):
        code, _, err = cli(capsys, "profile", path, "--device", board.url, "--token-file", token_file, "--db", db,
                           "--signature", signature)
        assert code == 2 and err.strip() == (f"edgeq: error: --signature: {signature!r} is not a signature of "
                                             f"{path.name} (it has: {has})")
    assert board.requests == [] and store.list_results(db) == []


def test_an_unknown_dim_is_refused_listing_the_files_dims(fake_board, tmp_path, capsys, token_file, tiny_onnx):
    board, db = fake_board(), tmp_path / "r.sqlite"
    code, _, err = cli(capsys, "profile", tiny_onnx, "--device", board.url, "--token-file", token_file, "--db", db,
                       "--dim", "nosuch=4", "--dim", "sequence=8")
    assert code == 2 and err.strip() == ("edgeq: error: --dim nosuch=4: no input of tiny.onnx has a dim of that name "
                                         "(tiny.onnx: batch, sequence)")
    assert board.requests == [] and store.list_results(db) == []
