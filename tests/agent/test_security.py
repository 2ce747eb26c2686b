"""Authentication, size caps, JSON-only messages, idempotent jobs and TLS, on a real agent."""

from __future__ import annotations

import http.client
import json
import pickle
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from edgeq.agent.client import AgentClient, AgentError
from edgeq.fileio import sha256_file

from .conftest import FAST, run_job


def raw(agent, method, path, body=b"", headers=None, send_body=True):
    """One raw HTTP exchange (no client-side checks) -> (status, json body)."""
    host, port = agent.url.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders(body if send_body and body else None)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def auth(agent, **extra):
    return {"Authorization": f"Bearer {agent.token}", **extra}


def still_serving(agent):
    assert agent.client().info()["protocol"] == 1


def test_no_token_and_wrong_token_refused(shared_agent):
    status, body = raw(shared_agent, "GET", "/v1/info")
    assert status == 401 and "missing bearer token" in body["error"]
    with pytest.raises(AgentError, match="401: wrong token"):
        shared_agent.client(token="x" * 32).info()
    with pytest.raises(AgentError, match="401"):
        shared_agent.client(token=shared_agent.token[:-1]).info()
    still_serving(shared_agent)


def test_upload_one_byte_over_cap_refused(shared_agent, tmp_path):
    cap = shared_agent.client().info()["max_upload_bytes"]
    at_cap, over = tmp_path / "at.bin", tmp_path / "over.bin"
    at_cap.write_bytes(b"a" * cap)
    over.write_bytes(b"a" * (cap + 1))
    client = shared_agent.client()
    assert client.upload(at_cap) == sha256_file(at_cap)
    with pytest.raises(AgentError, match="413: body of .* over the cap"):
        client.upload(over)
    assert not client.has_artifact(sha256_file(over))
    still_serving(shared_agent)


def test_header_claiming_1gb_refused_before_reading(shared_agent):
    sha = "0" * 64
    status, body = raw(shared_agent, "PUT", f"/v1/artifacts/{sha}",
                       headers=auth(shared_agent, **{"Content-Length": str(10**9)}), send_body=False)
    assert status == 413 and "over the cap" in body["error"]
    status, body = raw(shared_agent, "POST", "/v1/jobs", headers=auth(
        shared_agent, **{"Content-Length": str(10**9), "Content-Type": "application/json"}), send_body=False)
    assert status == 413
    status, _ = raw(shared_agent, "PUT", f"/v1/artifacts/{sha}", headers=auth(
        shared_agent, **{"Transfer-Encoding": "chunked"}), send_body=False)
    assert status == 411
    still_serving(shared_agent)


def test_hash_mismatch_discarded(shared_agent):
    data = b"not what the hash says"
    status, body = raw(shared_agent, "PUT", f"/v1/artifacts/{'a' * 64}", data,
                       headers=auth(shared_agent, **{"Content-Length": str(len(data))}))
    assert status == 400 and "pinned" in body["error"]
    assert not shared_agent.client().has_artifact("a" * 64)
    assert not list((shared_agent.data_dir / "artifacts").glob(".upload-*"))


def test_pickle_payload_and_unknown_type_refused(shared_agent):
    payload = pickle.dumps({"type": "submit", "protocol": 1})
    for ctype in ("application/octet-stream", "application/python-pickle"):
        status, body = raw(shared_agent, "POST", "/v1/jobs", payload, headers=auth(
            shared_agent, **{"Content-Type": ctype, "Content-Length": str(len(payload))}))
        assert status == 415 and "application/json only" in body["error"]
    status, body = raw(shared_agent, "POST", "/v1/jobs", payload, headers=auth(
        shared_agent, **{"Content-Type": "application/json", "Content-Length": str(len(payload))}))
    assert status == 400 and "not valid UTF-8 JSON" in body["error"]
    for msg, expect in (({"protocol": 1, "type": "exec", "code": "import os"}, "type: 'exec'"),
                        ({"protocol": 2, "type": "submit"}, "protocol: 2"),
                        ([1, 2], "JSON object")):
        data = json.dumps(msg).encode()
        status, body = raw(shared_agent, "POST", "/v1/jobs", data, headers=auth(
            shared_agent, **{"Content-Type": "application/json", "Content-Length": str(len(data))}))
        assert status == 400 and expect in body["error"], body
    still_serving(shared_agent)


def test_bad_submit_fields_refused(shared_agent, tiny_onnx):
    client = shared_agent.client()
    sha = client.upload(tiny_onnx)
    bad = [
        ("../x", {"name": "m.onnx", "sha256": sha}, {}, "job_id"),
        ("ok1", {"name": "../m.onnx", "sha256": sha}, {}, "plain file name"),
        ("ok2", {"name": "m.onnx", "sha256": "b" * 64}, {}, "not uploaded"),
        ("ok3", {"name": "m.onnx", "sha256": sha}, {"runs": -1}, "config.runs"),
        ("ok4", {"name": "m.onnx", "sha256": sha}, {"power_meter": "command:rm -rf /"}, "unknown keys"),
    ]
    for job_id, artifact, config, expect in bad:
        with pytest.raises(AgentError, match=expect):
            client.submit(job_id, artifact, [], None, config)
    # an external-data name that would alias the agent's own files in the job directory
    with pytest.raises(AgentError, match="reserved"):
        client.submit("ok5", {"name": "m.onnx", "sha256": sha}, [{"name": "runner.log", "sha256": sha}], None, {})
    # FILE.json's runtime_min: a map of names to text or null, tied to the sha256 it was written for
    for meta, expect in (({"runtime_min": {"onnxruntime": "1.19"}}, "metadata.sha256"),
                         ({"sha256": sha, "runtime_min": {"onnxruntime": 1.19}}, "metadata.runtime_min"),
                         ({"sha256": sha, "runtime_min": ["onnxruntime"]}, "metadata.runtime_min"),
                         ({"sha256": sha, "variant": {"x": 1}, "runtime_min": {}}, "metadata.variant")):
        with pytest.raises(AgentError, match=expect):
            client.submit("ok6", {"name": "m.onnx", "sha256": sha}, [], meta, {})


def test_same_job_id_50_times_runs_once(shared_agent, tiny_onnx):
    client = shared_agent.client()
    sha = client.upload(tiny_onnx)
    art = {"name": "tiny.onnx", "sha256": sha}
    answers, errors = [], []

    def submit():
        try:
            answers.append(client.submit("same-id", art, [], None, FAST))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(25):
        submit()
    assert not errors and len(answers) == 50
    first = client.wait("same-id", poll_s=0.1)
    again = client.submit("same-id", art, [], None, FAST)
    assert again["finished"] == client.job("same-id")["finished"]
    assert client.result("same-id") == first
    starts = {a["created"] for a in answers}
    assert len(starts) == 1
    runner_logs = list((shared_agent.data_dir / "jobs").glob("same-id/runner.log"))
    assert len(runner_logs) == 1
    # the same id with another artifact is refused
    other = tiny_onnx.parent / "other.onnx"
    other.write_bytes(tiny_onnx.read_bytes() + b"\x00")
    with pytest.raises(AgentError, match="409: job_id: 'same-id' was already used"):
        client.submit("same-id", {"name": "tiny.onnx", "sha256": client.upload(other)}, [], None, FAST)
    with pytest.raises(AgentError, match="409"):
        client.submit("same-id", art, [], None, {**FAST, "runs": 11})


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, server and client certificate made by the script shipped in targets/tls/."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")
    script = Path(__file__).resolve().parents[2] / "targets" / "tls" / "make-certs.sh"
    subprocess.run(["bash", str(script), str(d), "127.0.0.1", "localhost"], check=True, capture_output=True)
    return d


def test_tls_required_plaintext_refused(agent_factory, certs, tiny_onnx):
    agent = agent_factory(["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")])
    assert agent.url.startswith("https://")
    plain = AgentClient(agent.url.replace("https://", "http://"), agent.token, retries=1)
    with pytest.raises(AgentError, match="connection closed by the agent.*https://"):
        plain.info()
    with pytest.raises(AgentError, match="TLS failed"):  # no CA given: the self-made CA is not trusted
        agent.client(retries=1).info()
    client = agent.client(ca_file=str(certs / "ca.pem"))
    assert client.info()["protocol"] == 1
    assert run_job(client, tiny_onnx)["status"] == "valid"


def test_client_certificate_required(agent_factory, certs):
    agent = agent_factory(["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                           "--client-ca", str(certs / "ca.pem")])
    with pytest.raises(AgentError):
        agent.client(ca_file=str(certs / "ca.pem"), retries=1).info()
    client = agent.client(ca_file=str(certs / "ca.pem"), client_cert=str(certs / "client.pem"),
                          client_key=str(certs / "client.key"))
    assert client.info()["protocol"] == 1
    assert agent.token not in (agent.root / "agent.log").read_text()  # never logged


def test_token_file_open_to_others_is_warned_about(agent_factory):
    """Like ssh with a private key: a token other users can read lets them run models on the board, so the agent
    says so at start (it still serves: the file is the owner's to fix); a 0600 file gets no warning, nor does the
    installers' 0640 with the agent's group."""
    private = agent_factory(name="private")
    private.stop()
    private.token_file.chmod(0o640)
    private.start().stop()
    assert "token file" not in (private.root / "agent.log").read_text()
    private.token_file.chmod(0o644)
    shared = private.start()
    still_serving(shared)
    log = (shared.root / "agent.log").read_text()
    assert f"WARNING: token file {shared.token_file} is open to every user (mode 644); chmod 600 it" in log
    assert shared.token not in log


@pytest.mark.parametrize("flag,value", [("--max-upload-mb", "0"), ("--max-upload-mb", "-1"), ("--port", "70000"),
                                        ("--max-job-seconds", "0"), ("--max-memory-mb", "1")])
def test_serve_refuses_limits_that_disable_it(flag, value, tmp_path, capsys):
    """`--max-upload-mb 0` used to mean the default 1 GiB and a negative cap refused every upload; both are refused."""
    from edgeq.cli.main import main

    token = tmp_path / "token"
    token.write_text("t" * 32)
    assert main(["agent", "serve", "--token-file", str(token), "--data-dir", str(tmp_path / "d"), flag, value]) == 2
    assert f"Invalid value for '{flag}'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
