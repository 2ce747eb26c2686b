#!/usr/bin/env python
"""What the runner's sandbox (edgeq/agent/sandbox.py) costs a measurement: the same files profiled by two real agents on
this machine, one with `--sandbox on`, one with `--sandbox off`, jobs interleaved (on, off, off, on, ...).

Usage: .venv/bin/python tools/probe_sandbox_overhead.py FILE [FILE...] [--reps 5] [--threads 2]
       [--out benchmarks/sandbox_overhead]

Per file and mode: the median over repetitions of each job's p50 latency, load and first-inference times, and
the ratio sandboxed / not. Writes OUT.json and OUT.md. Nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeq.agent.bundles import bundle
from edgeq.agent.client import AgentClient
from edgeq.agent.jobs import AgentConfig
from edgeq.agent.server import AgentServer
from edgeq.fileio import write_json_atomic, write_text_atomic


def start(root: Path, mode: str) -> AgentServer:
    cfg = AgentConfig(token=secrets.token_urlsafe(24), data_dir=root / mode, port=0, power_meter="none", sandbox=mode)
    server = AgentServer(cfg)
    server.RequestHandlerClass.log_message = lambda *a: None  # no line per request
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def run(client: AgentClient, path: Path, threads: int) -> dict:
    b = bundle(path)  # as `edgeq profile` sends it: the file, its external data, FILE.json
    client.upload(path)
    for f, _ in b.files:
        client.upload(f)
    job_id = f"s-{secrets.token_hex(6)}"
    files = [{"name": f.name, "sha256": sha} for f, sha in b.files]
    client.submit(job_id, {"name": path.name, "sha256": b.sha256}, files, b.meta,
                  {"runs": 30, "min_seconds": 3.0, "threads": threads})
    result = client.wait(job_id, poll_s=0.2, timeout_s=900)
    if result.get("status") != "valid":
        sys.exit(f"{path.name}: job {result.get('status')}: {result.get('error') or result.get('invalid_reasons')}")
    return {"p50_ms": result["latency_ms"]["p50"], "load_ms": result["load_ms"],
            "first_inference_ms": result["first_inference_ms"], "sandbox": result.get("sandbox")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/sandbox_overhead"))
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        servers = {mode: start(Path(tmp), mode) for mode in ("on", "off")}
        if servers["on"].agent.sandbox is None:
            sys.exit(f"this machine cannot sandbox a runner: {servers['on'].agent.info['sandbox_reason']}")
        clients = {mode: AgentClient(s.url, s.agent.cfg.token) for mode, s in servers.items()}
        runs: dict = {f.name: {"on": [], "off": []} for f in args.files}
        for rep in range(args.reps):
            for path in args.files:
                for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                    runs[path.name][mode].append(run(clients[mode], path, args.threads))
                    print(f"rep {rep} {path.name} sandbox {mode}: p50 {runs[path.name][mode][-1]['p50_ms']:.3f} ms",
                          flush=True)
        for server in servers.values():
            server.shutdown()
            server.server_close()
    rows = []
    for name, by_mode in runs.items():
        med = {mode: {k: statistics.median(r[k] for r in by_mode[mode]) for k in ("p50_ms", "load_ms",
                                                                                   "first_inference_ms")}
               for mode in by_mode}
        rows.append({"file": name, "on": med["on"], "off": med["off"],
                     "p50_ratio": med["on"]["p50_ms"] / med["off"]["p50_ms"],
                     "load_ratio": med["on"]["load_ms"] / med["off"]["load_ms"], "runs": by_mode})
    command = " ".join([".venv/bin/python tools/probe_sandbox_overhead.py", *map(str, args.files),
                        "--reps", str(args.reps), "--threads", str(args.threads), "--out", str(args.out)])
    doc = {"created": started, "command": command, "machine": platform.machine(), "processor": platform.processor(),
           "threads": args.threads, "reps": args.reps, "rows": rows}
    write_json_atomic(args.out.with_suffix(".json"), doc)
    lines = ["# The runner's sandbox: what it costs a measurement (probe)", "", "```", command, "```", "",
             f"Created {started} on this {platform.machine()} host, {args.threads} threads, {args.reps} repetitions "
             "per file and mode, jobs interleaved between two agents (`--sandbox on` / `off`); each cell the "
             "median over repetitions of a job's value (p50 over >= 30 runs and >= 3 s).", "",
             "| file | p50 ms, sandbox | p50 ms, none | ratio | load ms, sandbox | load ms, none | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | {r['on']['p50_ms']:.3f} | {r['off']['p50_ms']:.3f} | {r['p50_ratio']:.3f} | "
                     f"{r['on']['load_ms']:.1f} | {r['off']['load_ms']:.1f} | {r['load_ratio']:.3f} |")
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
