"""The agent in its own network namespace behind a veth pair; the link is cut mid-run.

Addresses are link-local (169.254.77.0/30) on a veth pair this test creates and deletes; no
traffic leaves the machine. Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import pytest

from edgeq import store
from edgeq.agent import host

from .conftest import FAST, AgentProc

pytestmark = pytest.mark.netns

HOST_IP, AGENT_IP = "169.254.77.1", "169.254.77.2"


def _ip(*args, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip) for a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, veth_host, veth_agent = f"edgeq-t{tag}", f"veqh{tag}", f"veqa{tag}"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", veth_host, "type", "veth", "peer", "name", veth_agent)
        _ip("link", "set", veth_agent, "netns", ns)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", veth_host)
        _ip("link", "set", veth_host, "up")
        _ip("addr", "add", f"{AGENT_IP}/30", "dev", veth_agent, ns=ns)
        _ip("link", "set", veth_agent, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        yield ns, veth_host
    finally:
        subprocess.run(["ip", "link", "del", veth_host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_link_cut_mid_run_reports_clear_error_and_stores_nothing(netns, tmp_path, tiny_onnx):
    ns, veth_host = netns
    agent = AgentProc(tmp_path, host=AGENT_IP, netns=ns).start()
    try:
        assert agent.url.startswith(f"http://{AGENT_IP}:")
        db = tmp_path / "results.sqlite"
        device = host.Device(name="nsboard", url=agent.url, token_file=str(agent.token_file))
        config = {**FAST, "min_seconds": 5.0, "max_seconds": 20.0}
        out: list = []
        running = threading.Event()

        def on_progress(dev, art, job):
            if (job.get("progress") or {}).get("phase") == "timed":
                running.set()

        def run():  # a short network timeout so the cut is noticed quickly
            out.extend(host.profile([tiny_onnx], [device], config, str(db), on_progress=on_progress,
                                    timeout_s=2.0))

        t = threading.Thread(target=run)
        t.start()
        assert running.wait(30), "job never started"
        _ip("link", "set", veth_host, "down")
        t.join(timeout=60)
        assert out and out[0]["status"] == "error", out
        assert "no answer within" in out[0]["error"] or "connection" in out[0]["error"], out[0]["error"]
        assert store.list_results(db) == []  # nothing half-stored

        _ip("link", "set", veth_host, "up")
        client = agent.client(timeout=10)
        job_id = _only_job(agent)
        deadline = time.monotonic() + 30
        while client.job(job_id)["state"] not in ("done", "failed", "aborted") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.result(job_id)["status"] == "valid"  # the agent kept serving and finished the job
    finally:
        agent.stop()


def _only_job(agent: AgentProc) -> str:
    jobs = [p.name for p in (agent.data_dir / "jobs").iterdir()]
    assert len(jobs) == 1
    return jobs[0]
