#!/usr/bin/env python
"""Soak the edgeq agent: kill it mid-benchmark N times, then submit one job id 50 times.

Usage: .venv/bin/python tools/soak_agent.py [--kills 20] [--out benchmarks/agent_soak.txt]

Each kill: start a long job on a real agent (127.0.0.1, port 0), wait until it is timing, SIGKILL
the agent while the host polls, check that the host reported the loss, that the runner process
died with the agent, then restart the agent on the same data directory and check the job is
`aborted` (and stays aborted when resubmitted) and a fresh job still runs valid.
Nothing leaves loopback. Needs `onnx` (host extra) to build the tiny test model.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgeq.agent.client import AgentClient, AgentError
from edgeq.agent.server import READY_PREFIX
from edgeq.fileio import sha256_file

FAST = {"runs": 10, "min_seconds": 0.05, "warmup_min": 2, "warmup_max": 10}
LONG = {**FAST, "min_seconds": 60.0, "max_seconds": 120.0}


def tiny_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


class Agent:
    def __init__(self, root: Path):
        self.root, self.token = root, secrets.token_urlsafe(24)
        (root / "token").write_text(self.token)
        self.proc = None

    def start(self) -> "Agent":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeq.cli.main", "agent", "serve", "--port", "0", "--token-file",
             str(self.root / "token"), "--data-dir", str(self.root / "data"), "--power-meter", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        self.url = line.split()[1]
        return self

    def client(self, **kw) -> AgentClient:
        return AgentClient(self.url, self.token, **kw)

    def runner_pids(self, job_id: str) -> list[int]:
        needle = str(self.root / "data" / "jobs" / job_id).encode()
        out = []
        for p in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
        return out


def wait_timed(client: AgentClient, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if job["state"] == "running" and (job.get("progress") or {}).get("phase") == "timed":
            return
        time.sleep(0.05)
    raise RuntimeError(f"{job_id} never reached the timed phase")


def one_kill(agent: Agent, model: Path, sha: str, i: int) -> dict:
    job_id = f"soak-{i:02d}"
    client = agent.client(retries=1, timeout=5)
    client.submit(job_id, {"name": model.name, "sha256": sha}, [], None, LONG)
    wait_timed(client, job_id)
    seen = {"host_error": None}

    def poll():
        try:
            client.wait(job_id, poll_s=0.05)
        except AgentError as exc:
            seen["host_error"] = str(exc)

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.2)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()
    t.join(30)
    deadline = time.monotonic() + 5
    while agent.runner_pids(job_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen["runner_orphans"] = len(agent.runner_pids(job_id))
    t0 = time.monotonic()
    agent.start()
    seen["restart_s"] = time.monotonic() - t0
    c = agent.client()
    seen["state_after"] = c.job(job_id)["state"]
    seen["resubmit"] = c.submit(job_id, {"name": model.name, "sha256": sha}, [], None, LONG)["state"]
    fresh = f"fresh-{i:02d}"
    c.submit(fresh, {"name": model.name, "sha256": sha}, [], None, FAST)
    seen["fresh"] = c.wait(fresh, poll_s=0.05)["status"]
    seen["ok"] = (seen["host_error"] is not None and f"while job {job_id} was in progress" in seen["host_error"]
                  and seen["runner_orphans"] == 0 and seen["state_after"] == "aborted"
                  and seen["resubmit"] == "aborted" and seen["fresh"] == "valid")
    return seen


def same_id(agent: Agent, model: Path, sha: str, n: int = 50) -> dict:
    c = agent.client()
    art = {"name": model.name, "sha256": sha}
    states = [c.submit("same-id", art, [], None, FAST)["state"] for _ in range(n)]
    result = c.wait("same-id", poll_s=0.05)
    again = [c.result("same-id") == result for _ in range(5)]
    runs = len(list((agent.root / "data" / "jobs").glob("same-id/runner.log")))
    try:
        c.submit("same-id", {**art, "sha256": "f" * 64}, [], None, FAST)
        other = "accepted (BAD)"
    except AgentError as exc:
        other = f"refused {exc.status}"
    return {"submits": n, "first_states": sorted(set(states)), "runner_started": runs,
            "same_result": all(again), "other_hash": other}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines = [f"$ {' '.join([Path(sys.executable).name, *sys.argv])}",
             f"# started {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    say = lambda s: (print(s, flush=True), lines.append(s))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="edgeq-soak-") as tmp:
        root = Path(tmp)
        model = tiny_model(root / "tiny.onnx")
        agent = Agent(root).start()
        try:
            sha = agent.client().upload(model)
            assert sha == sha256_file(model)
            say(f"{'kill':>4} {'host error (as the host reported it)':<118} {'orphans':>7} {'after':<8} {'resubmit':<8} {'fresh':<6} "
                f"{'restart s':>9} ok")
            ok = 0
            for i in range(args.kills):
                s = one_kill(agent, model, sha, i)
                ok += s["ok"]
                say(f"{i:>4} {(s['host_error'] or '-').split(': ', 1)[-1][:118]:<118} {s['runner_orphans']:>7} {s['state_after']:<8} "
                    f"{s['resubmit']:<8} {s['fresh']:<6} {s['restart_s']:>9.2f} {'yes' if s['ok'] else 'NO'}")
            say(f"# kills: {ok}/{args.kills} clean (host reported, runner died with agent, job aborted, "
                "resubmit stays aborted, fresh job valid)")
            r = same_id(agent, model, sha)
            say(f"# same job id: {r['submits']} submits -> states {r['first_states']}, runner started "
                f"{r['runner_started']} time(s), identical result on re-fetch: {r['same_result']}, "
                f"same id + other hash: {r['other_hash']}")
        finally:
            agent.proc.terminate()
            agent.proc.wait(15)
    lines.append(f"# finished {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if ok == args.kills and r["runner_started"] == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
