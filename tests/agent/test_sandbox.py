"""The runner's sandbox (edgeq/agent/sandbox.py) on this machine's real kernel: what code running in it can still
reach, as the agent's user and (when the tests run as root) as an unprivileged one, and the agent's jobs in it."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edgeq.agent import jobs
from edgeq.agent.jobs import Agent, AgentConfig, probe_sandbox
from edgeq.errors import EdgeqError

from .conftest import run_job

EDGEQ_ROOT = Path(jobs.__file__).resolve().parents[2]

# Run inside the sandbox by sandbox.run: every attempt a model's code could make, and what came of it.
ATTACK = r'''
import ctypes, json, os, socket, sys
from edgeq.agent import sandbox

data_dir, job_dir, token, secret_dir, outside, port, unix_path = sys.argv[1:8]

def attack(job_dir):
    out = {}
    def attempt(name, fn):
        try:
            out[name] = ["ok", fn()]
        except OSError as exc:  # sandbox.SandboxError too
            out[name] = ["err", exc.errno]
    attempt("read_token", lambda: open(token).read())
    attempt("list_hidden_dir", lambda: os.listdir(secret_dir))
    attempt("list_data_dir", lambda: sorted(os.listdir(data_dir)))
    attempt("list_jobs", lambda: sorted(os.listdir(os.path.join(data_dir, "jobs"))))
    attempt("write_job_dir", lambda: open(os.path.join(job_dir, "written"), "w").write("x"))
    attempt("write_outside", lambda: open(os.path.join(outside, "planted"), "w").write("x"))
    attempt("connect_agent", lambda: socket.create_connection(("127.0.0.1", int(port)), timeout=5).close())
    attempt("connect_unix_socket", lambda: socket.socket(socket.AF_UNIX).connect(unix_path))
    attempt("open_vsock", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close())
    attempt("open_udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())  # allowed, goes nowhere
    attempt("pids", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    attempt("status", lambda: {k: v.strip() for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
                               if k in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")})
    libc = ctypes.CDLL(None, use_errno=True)
    attempt("unmount_data_dir", lambda: libc.umount2(data_dir.encode(), 2) or "unmounted")
    attempt("remount_root_rw", lambda: sandbox._mount(None, "/", None, sandbox.MS_REMOUNT | sandbox.MS_BIND))
    script = os.path.join(job_dir, "run.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o755)
    attempt("exec_from_job_dir", lambda: os.execv(script, [script]))
    print(json.dumps(out))
    return 0

sandbox.run(data_dir, job_dir, [token, secret_dir], attack)
'''


def _sandbox_works() -> str | None:
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "jobs").mkdir()
        return probe_sandbox(Path(root))


_REASON = _sandbox_works()
needs_sandbox = pytest.mark.skipif(_REASON is not None, reason=f"this kernel cannot sandbox a runner: {_REASON}")


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 (the agent's port, as far as a runner can tell)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _layout(root: Path) -> dict:
    data, outside, secret = root / "data", root / "outside", root / "secret"
    job = data / "jobs" / "j1"
    for d in (job, data / "jobs" / "other-job", data / "artifacts", outside, secret):
        d.mkdir(parents=True)
    (data / "journal.sqlite").write_text("the journal")
    (secret / "id_ed25519").write_text("a key")
    token = root / "token"
    token.write_text("the-token")
    return {"data": data, "job": job, "token": token, "secret": secret, "outside": outside}


def _attack(paths: dict, port: int, python: str = sys.executable, pythonpath: str = str(EDGEQ_ROOT),
            preexec=None) -> dict:
    unix_path = str(paths["outside"] / "bus.sock")  # a session bus, an ssh-agent, docker.sock: open to anyone here
    with socket.socket(socket.AF_UNIX) as bus:
        bus.bind(unix_path)
        bus.listen()
        os.chmod(unix_path, 0o777)
        done = subprocess.run([python, "-c", ATTACK, *(str(paths[k]) for k in ("data", "job", "token", "secret",
                                                                               "outside")), str(port), unix_path],
                              cwd=paths["job"], env={"PATH": os.environ["PATH"], "PYTHONPATH": pythonpath},
                              capture_output=True, text=True, timeout=60, preexec_fn=preexec)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _assert_confined(seen: dict, paths: dict) -> None:
    assert seen["read_token"] == ["ok", ""]  # /dev/null over the file
    assert seen["list_hidden_dir"] == ["ok", []]
    assert seen["list_data_dir"] == ["ok", ["jobs"]]  # no journal, no artifacts ...
    assert seen["list_jobs"] == ["ok", ["j1"]]  # ... no other job
    assert seen["write_job_dir"] == ["ok", 1]
    assert (paths["job"] / "written").read_text() == "x"  # the job's real directory, as the agent reads it
    assert seen["write_outside"] == ["err", 30]  # EROFS
    assert not (paths["outside"] / "planted").exists()
    assert seen["connect_agent"] == ["err", 101]  # ENETUNREACH: not even loopback
    assert seen["connect_unix_socket"] == ["err", 13]  # EACCES from the filter: no socket(AF_UNIX) at all
    assert seen["open_vsock"] == ["err", 13]
    assert seen["open_udp"] == ["ok", None]
    assert seen["pids"] == ["ok", [1, 2]]  # the namespace's init and the runner: no agent to read
    status = seen["status"][1]
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"  # a filter
    assert seen["unmount_data_dir"] == ["ok", -1]
    assert seen["remount_root_rw"][0] == "err"
    assert seen["exec_from_job_dir"] == ["err", 13]  # EACCES: the job's directory is noexec
    assert (paths["data"] / "journal.sqlite").read_text() == "the journal"  # hidden from it, not removed


@needs_sandbox
def test_runner_code_is_confined(tmp_path, listener):
    paths = _layout(tmp_path)
    _assert_confined(_attack(paths, listener), paths)


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root (to become an unprivileged user) and /usr/bin/python3")
def test_runner_code_is_confined_as_an_unprivileged_user(listener):
    """As a board's `edgeq` service user: the same sandbox without any privilege to start from."""
    root = Path(tempfile.mkdtemp(prefix="edgeq-sandbox-"))
    try:
        package = root / "pkg" / "edgeq" / "agent"
        package.mkdir(parents=True)
        for name in ("__init__.py", "agent/__init__.py", "agent/sandbox.py"):  # all the attack imports
            shutil.copy(EDGEQ_ROOT / "edgeq" / name, root / "pkg" / "edgeq" / name)
        paths = _layout(root / "box")
        for path in [root, *root.rglob("*")]:
            os.chown(path, 65534, 65534)
            os.chmod(path, 0o700 if path.is_dir() else 0o600)

        def as_nobody():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        seen = _attack(paths, listener, "/usr/bin/python3", str(root / "pkg"), as_nobody)
        _assert_confined(seen, paths)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_sandbox
@pytest.mark.parametrize("ending, code", [("return 3", 3), ("os.kill(os.getpid(), signal.SIGXCPU)", -24),
                                          ("os.kill(os.getpid(), signal.SIGSEGV)", -11)])
def test_the_agent_sees_the_runner_end_as_it_ended(tmp_path, ending, code):
    """Exit code or signal, through the namespace's init and the waiter: the agent tells a CPU-time limit (SIGXCPU)
    and a runtime crash (SIGSEGV) apart by it. As process 1 of its namespace the runner would ignore SIGXCPU."""
    paths = _layout(tmp_path)
    script = ("import os, signal\nfrom edgeq.agent import sandbox\n"
              f"def end(job_dir):\n    {ending}\n"
              f"sandbox.run({str(paths['data'])!r}, {str(paths['job'])!r}, [], end)\n")
    done = subprocess.run([sys.executable, "-c", script], env={"PYTHONPATH": str(EDGEQ_ROOT)}, timeout=60)
    assert done.returncode == code


def _namespaces(pid: int | str) -> dict:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("user", "mnt", "net", "pid", "ipc")}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


@needs_sandbox
def test_agent_runs_each_job_in_the_sandbox(inproc, tiny_onnx):
    """A real job through the agent: its runner process is in namespaces of its own with no capabilities (read from
    outside, while it runs), its result is measured as before, and the agent says how its runners are confined."""
    from edgeq.agent.client import AgentClient

    server = inproc(sandbox="on")
    client = AgentClient(server.url, server.agent.cfg.token)
    info = client.info()
    assert info["sandbox"].startswith("Linux namespaces") and info["sandbox_reason"] is None
    seen: dict = {}

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "runner" not in seen:
            proc = server.agent._proc
            for pid in _descendants(proc.pid) if proc else []:
                try:  # the waiter outside, the namespace's init and the runner share a command line; only the runner
                    if "numpy" in Path(f"/proc/{pid}/maps").read_text():  # has imported numpy
                        status = Path(f"/proc/{pid}/status").read_text()
                        seen["runner"] = (_namespaces(pid), status)
                except OSError:
                    pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = run_job(client, tiny_onnx, {"runs": 20, "min_seconds": 2.0})
    watcher.join()
    assert result["status"] == "valid", result
    assert result["sandbox"] == info["sandbox"]
    assert "runner" in seen, "the runner was never seen running"
    spaces, status = seen["runner"]
    mine = _namespaces("self")
    assert all(spaces[ns] != mine[ns] for ns in mine), (spaces, mine)
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["CapEff"].strip() == "0000000000000000" and fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"


def test_agent_without_the_sandbox(inproc, tiny_onnx, monkeypatch, capsys):
    """--sandbox off runs as before and says so; where the kernel refuses, auto warns and says why, and on refuses
    to start."""
    from edgeq.agent.client import AgentClient

    server = inproc(sandbox="off")
    result = run_job(AgentClient(server.url, server.agent.cfg.token), tiny_onnx)
    assert result["status"] == "valid" and result["sandbox"] is None
    assert server.agent.info["sandbox_reason"].startswith("turned off")

    monkeypatch.setattr(jobs, "probe_sandbox", lambda data_dir, hide: "unshare: Operation not permitted")
    server = inproc(sandbox="auto")
    assert server.agent.info["sandbox"] is None
    assert server.agent.info["sandbox_reason"] == "not available here: unshare: Operation not permitted; rlimits only"
    assert "runners are not sandboxed (unshare: Operation not permitted)" in capsys.readouterr().err
    with pytest.raises(EdgeqError, match=r"^sandbox: this machine cannot sandbox a runner \(unshare: Operation"):
        Agent(AgentConfig(token=secrets.token_urlsafe(24), data_dir=server.agent.data_dir.parent / "d", sandbox="on"))


@needs_sandbox
def test_hiding_what_the_runner_needs_is_refused(tmp_path):
    """A --sandbox-hide that covers the runner's own code is the operator's mistake: refused at start, never a
    reason to run jobs without the sandbox."""
    cfg = AgentConfig(token=secrets.token_urlsafe(24), data_dir=tmp_path / "data",
                      sandbox_hide=(EDGEQ_ROOT / "edgeq" / "agent",))
    with pytest.raises(EdgeqError, match=r"^sandbox: the runner cannot start in it: No module named "
                                         r"'edgeq\.agent\.runner'; does --sandbox-hide"):
        Agent(cfg)
    assert list((tmp_path / "data" / "jobs").iterdir()) == []  # the probe's scratch job is gone


def test_sandbox_options_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(24))
    data = tmp_path / "home" / "agent"
    for hide in (tmp_path / "home", data):
        with pytest.raises(EdgeqError, match=r"^sandbox-hide: .* holds the data directory"):
            AgentConfig(token=token.read_text(), data_dir=data, sandbox_hide=(hide,))
    with pytest.raises(EdgeqError, match=r"^sandbox: 'maybe' is not one of: auto, on, off"):
        AgentConfig(token=token.read_text(), data_dir=data, sandbox="maybe")
    from edgeq.cli.main import main

    (tmp_path / "home").mkdir()
    argv = ["agent", "serve", "--token-file", str(token), "--data-dir", str(data), "--port", "0"]
    assert main([*argv, "--sandbox-hide", str(tmp_path / "home")]) == 2
    assert main([*argv, "--sandbox-hide", str(tmp_path / "nope")]) == 2


def test_a_refusal_says_its_usual_cause(tmp_path, monkeypatch):
    """What `agent info` and the start-up warning say when a board's kernel refuses a step."""
    from edgeq.agent import sandbox

    assert sandbox.explain(sandbox.SandboxError(28, "unshare: No space left on device")) == \
        "unshare: No space left on device (user.max_user_namespaces is 0)"
    assert "CONFIG_USER_NS" in sandbox.explain(sandbox.SandboxError(22, "unshare: Invalid argument"))
    flag = tmp_path / "apparmor_restrict_unprivileged_userns"
    monkeypatch.setattr(sandbox, "_APPARMOR_USERNS", str(flag))
    refused = sandbox.SandboxError(1, "mount /: Operation not permitted")
    assert sandbox.explain(refused) == "mount /: Operation not permitted"  # no such file: no AppArmor to blame
    flag.write_text("0\n")
    assert sandbox.explain(refused) == "mount /: Operation not permitted"
    flag.write_text("1\n")
    assert sandbox.explain(refused) == (f"mount /: Operation not permitted (AppArmor restricts unprivileged user "
                                        f"namespaces: {flag} is 1)")


@needs_sandbox
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_kernel_that_refuses_user_namespaces(tmp_path):
    """A real refusal: `agent serve` in a user namespace whose user.max_user_namespaces is 0, as on a board that turned
    them off. --sandbox on refuses to start, in one line; auto (tested above) would run without it."""
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(24))
    serve = [sys.executable, "-m", "edgeq.cli.main", "agent", "serve", "--token-file", str(token), "--data-dir",
             str(tmp_path / "data"), "--port", "0", "--sandbox", "on"]
    inner = "echo 0 > /proc/sys/user/max_user_namespaces && exec " + " ".join(map(shlex.quote, serve))
    done = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", inner], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "edgeq: error: sandbox: this machine cannot sandbox a runner (unshare: No space left on device "
        "(user.max_user_namespaces is 0)); see docs/agent.md 'Sandbox', or run with --sandbox auto or off")
