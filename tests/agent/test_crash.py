"""Killing the agent mid-benchmark: the host reports it, the job is aborted, the restart is clean."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edgeq import store
from edgeq.agent import host
from edgeq.agent.client import AgentError

from .conftest import FAST, AgentProc, run_job

LONG = {**FAST, "min_seconds": 60.0, "max_seconds": 120.0}


def runner_pids(job_dir: Path) -> list[int]:
    """Processes whose command line names `job_dir` (the job's runner)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(job_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def wait_running(client, job_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if job["state"] == "running" and (job.get("progress") or {}).get("phase") == "timed":
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the timed phase: {job}")


def kill_once(agent: AgentProc, model: Path, job_id: str) -> dict:
    """Start a long job, SIGKILL the agent mid-benchmark, restart it; returns what was seen."""
    client = agent.client(retries=1, timeout=5)
    sha = client.upload(model)
    client.submit(job_id, {"name": model.name, "sha256": sha}, [], None, LONG)
    wait_running(client, job_id)
    seen: dict = {}

    def poll():
        try:
            client.wait(job_id, poll_s=0.05)
        except AgentError as exc:
            seen["host_error"] = str(exc)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.2)
    agent.kill()
    t.join(timeout=30)
    job_dir = agent.data_dir / "jobs" / job_id
    deadline = time.monotonic() + 5
    while runner_pids(job_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen["runner_left"] = runner_pids(job_dir)
    agent.start()
    client = agent.client()
    seen["state"] = client.job(job_id)["state"]
    seen["result"] = client.result(job_id)
    again = client.submit(job_id, {"name": model.name, "sha256": sha}, [], None, LONG)
    seen["resubmit_state"] = again["state"]
    return seen


def test_kill_agent_mid_benchmark_three_times(agent_factory, tiny_onnx):
    agent = agent_factory()
    for i in range(3):
        seen = kill_once(agent, tiny_onnx, f"crash-{i}")
        # refused (agent gone) or closed (killed while answering); either way named and explained
        assert f"while job crash-{i} was in progress" in seen["host_error"], seen["host_error"]
        assert "connection refused" in seen["host_error"] or "connection closed" in seen["host_error"]
        assert seen["runner_left"] == [], "the runner outlived the agent"
        assert seen["state"] == "aborted" and seen["resubmit_state"] == "aborted"
        assert seen["result"]["status"] == "aborted" and "stopped" in seen["result"]["error"]
    assert run_job(agent.client(), tiny_onnx)["status"] == "valid"  # clean after restarts


def test_profile_reports_killed_agent_and_stores_nothing(agent_factory, tiny_onnx, tmp_path):
    agent = agent_factory()
    db = tmp_path / "results.sqlite"
    device = host.Device(name="board", url=agent.url, token_file=str(agent.token_file))
    out: list = []
    progress_seen = threading.Event()

    def on_progress(dev, art, job):
        if (job.get("progress") or {}).get("phase") == "timed":
            progress_seen.set()

    t = threading.Thread(target=lambda: out.extend(host.profile([tiny_onnx], [device], LONG, str(db),
                                                                on_progress=on_progress)))
    t.start()
    assert progress_seen.wait(30)
    agent.kill()
    t.join(timeout=30)
    assert out[0]["status"] == "error" and "was in progress" in out[0]["error"], out[0]["error"]
    assert out[0]["row_id"] is None and store.list_results(db) == []


def test_sigterm_aborts_running_job(agent_factory, tiny_onnx):
    agent = agent_factory()
    client = agent.client()
    sha = client.upload(tiny_onnx)
    client.submit("term-1", {"name": tiny_onnx.name, "sha256": sha}, [], None, LONG)
    wait_running(client, "term-1")
    agent.stop()  # SIGTERM: graceful
    assert agent.proc.returncode == 0
    agent.start()
    assert agent.client().result("term-1")["status"] == "aborted"


@pytest.mark.parametrize("n", [2])
def test_journal_survives_restart_with_results(agent_factory, tiny_onnx, n):
    agent = agent_factory()
    ids = [f"keep-{i}" for i in range(n)]
    results = {i: run_job(agent.client(), tiny_onnx, job_id=i) for i in ids}
    agent.stop()
    agent.start()
    for i in ids:
        assert agent.client().result(i) == results[i]
