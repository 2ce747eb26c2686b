"""Job bookkeeping on the agent: configuration, the job queue, and running each job in a child.

Jobs run one at a time (so measurements do not disturb each other) in `runner.py` as a child
process in the job's own directory, with address-space, CPU-time, file-size and open-file limits
and a wall-clock watchdog, sandboxed in Linux namespaces where the kernel allows it (`sandbox.py`,
checked at start by `probe_sandbox`); the child dies with the agent. However a job ends, its directory keeps
only the agent's own small files (`job.json`, `progress.json`, `result.json`, `runner.log`): the
model's copy and anything the runtime wrote are removed. States are kept in the SQLite journal
(`journal.py`); the newest `keep_jobs` finished jobs of the last `keep_job_days` are kept, older
ones are forgotten with their directories. This module never loads a model itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import EdgeqError
from ..fileio import write_json_atomic
from . import protocol as P
from . import sandbox
from .artifacts import GiB, ArtifactStore
from .journal import Journal

MAX_QUEUED_JOBS = 256
SANDBOX_MODES = ("auto", "on", "off")
MAX_OPEN_FILES = 256  # a runner's RLIMIT_NOFILE
RUNNER_WRITE_SLACK = 1 << 30  # a runner's largest file: the job's files (ORT's optimized copy) plus this
# a runner error that is about memory (the runner's own "memory limit exceeded", a C++ bad_alloc, ...), not
# e.g. LiteRT's "AllocateTensors() called on inconsistent model"
_MEMORY_ERROR = re.compile(r"memory limit exceeded|MemoryError|bad_alloc|Failed to allocate|out of memory|"
                           r"Cannot allocate memory|failed to map segment", re.I)


@dataclasses.dataclass
class AgentConfig:
    """Everything `edgeq agent serve` decides; none of it can be changed by a host."""

    token: str
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    max_upload_bytes: int = P.DEFAULT_MAX_UPLOAD_BYTES
    max_job_seconds: float = 900.0
    max_memory_mb: int | None = None  # None: 80% of physical memory
    max_store_bytes: int = 8 * GiB  # uploaded files kept for re-use (least recently used evicted past it)
    min_free_bytes: int = 512 << 20  # an upload that would leave the disk with less is refused
    power_meter: str = "auto"
    sysfs_root: str = "/"
    request_timeout_s: float = 60.0  # a read or write that waits longer ends the connection
    header_timeout_s: float = 10.0  # TLS handshake, request line and headers, in total (server.py)
    keep_jobs: int = 1000  # finished jobs kept (journal rows and directories), newest first ...
    keep_job_days: float = 30.0  # ... and none older than this
    sandbox: str = "auto"  # the runner in Linux namespaces (sandbox.py): "on" requires it, "auto" uses it if it can
    sandbox_hide: tuple[Path, ...] = ()  # what a runner must not read: the token file, the TLS key, more

    def __post_init__(self):
        if len(self.token) < P.MIN_TOKEN_CHARS:
            raise EdgeqError(f"token: must be at least {P.MIN_TOKEN_CHARS} characters, got {len(self.token)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise EdgeqError("tls: --tls-cert and --tls-key must be given together")
        if self.client_ca is not None and self.tls_cert is None:
            raise EdgeqError("tls: --client-ca needs --tls-cert and --tls-key")
        if self.sandbox not in SANDBOX_MODES:
            raise EdgeqError(f"sandbox: {self.sandbox!r} is not one of: {', '.join(SANDBOX_MODES)}")
        data_dir = Path(self.data_dir).resolve()
        for path in self.sandbox_hide:
            if Path(path).resolve() in (data_dir, *data_dir.parents):
                raise EdgeqError(f"sandbox-hide: {path} holds the data directory {self.data_dir}, which each job's "
                                 "sandbox shows its own directory of")
        if self.max_memory_mb is None:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            self.max_memory_mb = int(pages * 0.8) >> 20


def read_token_file(path: str | os.PathLike) -> str:
    """The token in a file (surrounding whitespace stripped); refuses short tokens."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise EdgeqError(f"token file: cannot read {path}: {exc.strerror}") from None
    if len(token) < P.MIN_TOKEN_CHARS:
        raise EdgeqError(f"token file: {path} holds {len(token)} characters; at least {P.MIN_TOKEN_CHARS} are needed")
    return token


def _runner_limits(memory_mb: int, cpu_seconds: int, file_bytes: int | None = None):
    """preexec_fn for the runner: die with the agent, own process group, memory, CPU, file-size (`file_bytes`, a
    single file's; default unlimited) and open-file limits, and no core dumps."""

    def apply():
        os.setpgrp()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the agent
        except OSError:
            pass
        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing 1 GB runtime must not dump it on the card
        for which, want in ((resource.RLIMIT_NOFILE, MAX_OPEN_FILES), (resource.RLIMIT_FSIZE, file_bytes)):
            if want is None:
                continue
            hard = resource.getrlimit(which)[1]
            want = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(which, (want, want))

    return apply


def _runner_env(threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def sandbox_command(data_dir: Path, job_dir: Path, hide: tuple[Path, ...], probe: bool = False) -> list[str]:
    """The command that runs a job's runner (or, with `probe`, only checks that it could) in its sandbox."""
    args = [sys.executable, "-m", "edgeq.agent.sandbox", *(["--probe"] if probe else [])]
    for path in hide:
        args += ["--hide", str(Path(path).absolute())]  # the command runs in the job's directory
    return [*args, str(data_dir), str(job_dir)]


def probe_sandbox(data_dir: Path, hide: tuple[Path, ...] = ()) -> str | None:
    """Why a runner cannot be sandboxed on this machine (the kernel refuses a user namespace, a security module
    refuses a mount, ...), or None when it can: the sandbox made for a scratch job whose runner imports and
    writes its file. Raises when it can be made but hides what the runner needs (`hide` covers the Python
    install): a configuration error, never a reason to run without it."""
    import tempfile

    probe_dir = Path(tempfile.mkdtemp(prefix=".sandbox-probe-", dir=data_dir / "jobs"))
    try:
        done = subprocess.run(sandbox_command(data_dir, probe_dir, hide, probe=True), cwd=probe_dir, env=_runner_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        ok = (probe_dir / sandbox.PROBE_FILE).is_file()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the probe could not run: {exc}"
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    said = [line.removeprefix(sandbox.ERROR_PREFIX) for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 0 and ok:
        return None
    if done.returncode == sandbox.RUNNER_HIDDEN:
        raise EdgeqError(f"sandbox: {said[-1][:300]}; does --sandbox-hide (or the data directory) hold the Python "
                         "install?")
    return said[-1][:300] if said else f"the probe exited with code {done.returncode}"


def memory_note(error: str, memory_mb: int) -> str:
    """A runner's error, with the job's memory limit named when the error is about memory."""
    return f"{error} (memory limit {memory_mb} MB)" if _MEMORY_ERROR.search(error) else error


def last_log_line(log: Path) -> str | None:
    """The last non-empty line of a runner.log (what a runner that wrote no result last said), or None."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def killed_by(signum: int, memory_mb: int, cpu_seconds: int) -> str:
    """Why a runner died of signal `signum`, as far as the signal tells."""
    sig = signal.Signals(signum).name
    if sig == "SIGXCPU":
        return f"the runner was killed by SIGXCPU (the job's CPU-time limit, {cpu_seconds} s)"
    if sig == "SIGKILL":
        return (f"the runner was killed by SIGKILL (the system's out-of-memory killer, or another process; the job's "
                f"memory limit is {memory_mb} MB)")
    if sig in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"):
        return (f"the runner was killed by {sig}: the runtime crashed on this file (a runtime that cannot run it, e.g. "
                f"an older release, or an allocation past the job's memory limit of {memory_mb} MB)")
    return f"the runner was killed by {sig}"


class Agent:
    """Job bookkeeping and the single worker thread that runs jobs in order."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir).resolve()  # each runner works in its job's directory: no relative paths
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal = Journal(self.data_dir / "journal.sqlite")
        self.recovered = self.journal.recover()
        self.artifacts = ArtifactStore(self.data_dir / "artifacts", cfg.max_store_bytes, cfg.min_free_bytes,
                                       self.journal.active_artifacts)
        for d in (self.data_dir, self.data_dir / "jobs", self.artifacts.root):  # also a data dir made by an older agent
            try:
                d.chmod(0o700)
            except OSError as exc:
                sys.stderr.write(f"edgeq-agent: WARNING: cannot make {d} private (chmod 700): {exc.strerror}\n")
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="edgeq-worker", daemon=True)
        from . import fingerprint, meters

        meter, reason = meters.detect(cfg.power_meter, cfg.sysfs_root)
        self.sandbox, sandbox_reason = self._choose_sandbox()
        self.info = {"protocol": P.PROTOCOL_VERSION, "type": "info", "agent": "edgeq",
                     "version": fingerprint.runtime_versions().get("edgeq"),
                     "fingerprint": fingerprint.fingerprint(),
                     "power_meter": meter.describe() if meter else None, "power_reason": reason,
                     "max_upload_bytes": cfg.max_upload_bytes, "max_store_bytes": cfg.max_store_bytes,
                     "max_job_seconds": cfg.max_job_seconds,
                     "max_memory_mb": cfg.max_memory_mb, "sandbox": self.sandbox, "sandbox_reason": sandbox_reason}
        self._worker.start()

    def _choose_sandbox(self) -> tuple[str | None, str | None]:
        """What confines each runner (sandbox.py), described, or None and why not."""
        if self.cfg.sandbox == "off":
            return None, "turned off (agent serve --sandbox off): rlimits only"
        problem = probe_sandbox(self.data_dir, self.cfg.sandbox_hide)
        if problem is None:
            n = len(self.cfg.sandbox_hide)
            return sandbox.DESCRIPTION.format(hidden=f" and {n} more path{'s' * (n != 1)}" if n else ""), None
        if self.cfg.sandbox == "on":
            raise EdgeqError(f"sandbox: this machine cannot sandbox a runner ({problem}); see docs/agent.md 'Sandbox', "
                             "or run with --sandbox auto or off")
        sys.stderr.write(f"edgeq-agent: WARNING: runners are not sandboxed ({problem}); they run as this agent's "
                         "user with rlimits only (docs/agent.md 'Sandbox')\n")
        return None, f"not available here: {problem}; rlimits only"

    def artifact_path(self, sha: str) -> Path:
        return self.artifacts.path(sha)

    # ----- jobs
    def submit(self, request: dict) -> tuple[int, dict]:
        job_id = request["job_id"]
        fingerprint = P.request_fingerprint(request)
        for _ in range(2):
            existing = self.journal.get(job_id)
            if existing is not None:
                if existing["request_sha256"] != fingerprint:
                    raise P.ProtocolError(
                        f"job_id: {job_id!r} was already used for a different request (artifact "
                        f"{existing['artifact_sha256'][:12]}); job ids cannot be reused", 409)
                return 200, self.view(existing)
            missing = [ref["name"] for ref in [request["artifact"], *request["files"]]
                       if not self.artifact_path(ref["sha256"]).is_file()]
            if missing:
                raise P.ProtocolError(f"artifacts not uploaded yet: {missing}", 409)
            if self._queue.qsize() >= MAX_QUEUED_JOBS:
                raise P.ProtocolError(f"the agent already has {MAX_QUEUED_JOBS} jobs queued; retry later", 429)
            if self.journal.insert(job_id, fingerprint, request["artifact"]["sha256"], request):
                self._queue.put(job_id)
                return 201, self.view(self.journal.get(job_id))
        raise P.ProtocolError(f"job_id: {job_id!r} could not be stored", 500)

    def view(self, job: dict) -> dict:
        out = {"protocol": P.PROTOCOL_VERSION, "type": "job", "job_id": job["job_id"],
               "state": job["state"], "artifact_sha256": job["artifact_sha256"],
               "created": job["created"], "started": job["started"], "finished": job["finished"],
               "error": job["error"]}
        if job["state"] == "running":
            try:
                out["progress"] = json.loads((self.data_dir / "jobs" / job["job_id"] / "progress.json").read_text())
            except (OSError, ValueError):
                out["progress"] = None
        return out

    def _prepare_dir(self, job_dir: Path, request: dict) -> None:
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True, mode=0o700)
        for ref in [request["artifact"], *request["files"]]:
            self.artifacts.touch(ref["sha256"])
            src, dst = self.artifact_path(ref["sha256"]), job_dir / ref["name"]
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        job = {**request, "power_meter": self.cfg.power_meter, "sysfs_root": self.cfg.sysfs_root}
        write_json_atomic(job_dir / "job.json", job)

    @staticmethod
    def _clean_dir(job_dir: Path) -> None:
        """Everything but the agent's own files: the model's copy (a hard link to a stored file would keep it on
        the disk outside the store's cap), external data, ONNX Runtime's temporary optimized graph."""
        try:
            entries = list(job_dir.iterdir())
        except OSError:
            return
        for path in entries:
            if path.name in P.RESERVED_NAMES:
                continue
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                sys.stderr.write(f"edgeq-agent: could not remove {path}: {exc}\n")

    def _room(self, request: dict) -> tuple[int, str | None]:
        """The largest file the job's runner may write, and why the job must not start for want of disk (its
        runtime may write a copy of the model's size: ONNX Runtime's optimized graph, a TFLite signature's)."""
        need = sum(self.artifact_path(ref["sha256"]).stat().st_size for ref in [request["artifact"], *request["files"]])
        free = shutil.disk_usage(self.data_dir).free
        if free - need < self.cfg.min_free_bytes:
            return 0, (f"not started: the board's disk has {free / (1 << 20):.1f} MB free; this job may write "
                       f"{need / (1 << 20):.1f} MB and the agent keeps {self.cfg.min_free_bytes / (1 << 20):.0f} MB "
                       "free (agent --min-free-mb)")
        return max(min(need + RUNNER_WRITE_SLACK, free - self.cfg.min_free_bytes), 16 << 20), None  # its result.json

    def _run(self, job_id: str) -> tuple[str, dict | None, str | None]:
        job_dir = self.data_dir / "jobs" / job_id
        try:
            return self._run_in(job_id, job_dir)
        finally:  # however it ended: timed out, stopped, failed to start
            self._clean_dir(job_dir)

    def _run_in(self, job_id: str, job_dir: Path) -> tuple[str, dict | None, str | None]:
        job = self.journal.get(job_id)
        request = job["request"]
        cfg = request["config"]
        timeout = min(cfg.get("timeout_s") or self.cfg.max_job_seconds, self.cfg.max_job_seconds)
        memory = min(cfg.get("memory_mb") or self.cfg.max_memory_mb, self.cfg.max_memory_mb)
        file_cap, problem = self._room(request)
        if problem:
            return "failed", None, problem
        self._prepare_dir(job_dir, request)
        cmd = (sandbox_command(self.data_dir, job_dir, self.cfg.sandbox_hide) if self.sandbox
               else [sys.executable, "-m", "edgeq.agent.runner", str(job_dir)])
        with open(job_dir / "runner.log", "wb") as log:
            self._proc = subprocess.Popen(
                cmd, cwd=job_dir, env=_runner_env(cfg["threads"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_runner_limits(memory, int(timeout) + 1, file_cap))
            try:
                code = self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                return "failed", None, f"time limit exceeded: the job ran longer than {timeout:g} s and was killed"
            finally:
                self._proc = None
        if self._stopping.is_set():
            return "aborted", None, "the agent was stopped while this job was running"
        result = None
        try:
            result = json.loads((job_dir / "result.json").read_text())
        except (OSError, ValueError):
            pass
        if code < 0:
            tail = (job_dir / "runner.log").read_bytes()[-300:].decode("utf-8", "replace").strip()
            return "failed", None, f"{killed_by(-code, memory, int(timeout) + 1)}: {tail[-200:]}"
        if result is None:
            said = last_log_line(job_dir / "runner.log")
            if self.sandbox and code == sandbox.SANDBOX_FAILED and said and said.startswith(sandbox.ERROR_PREFIX):
                return "failed", None, ("not run: the runner's sandbox could not be made "
                                        f"({said.removeprefix(sandbox.ERROR_PREFIX)})")
            return "failed", None, memory_note(f"the runner exited with code {code} without a result"
                                               + (f"; its log ends: {said}" if said else ""), memory)
        if result.get("status") == "failed" or code != 0:
            err = memory_note(result.get("error") or f"the runner exited with code {code}", memory)
            return "failed", {**result, "status": "failed", "error": err}, err
        return "done", result, None

    def _work(self) -> None:
        self._prune()
        for job_id in self.journal.queued():
            self._queue.put(job_id)
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            if not self.journal.start(job_id):
                continue
            try:
                state, result, error = self._run(job_id)
            except Exception as exc:  # the agent must keep serving whatever one job does
                state, result, error = "failed", None, f"agent error: {type(exc).__name__}: {exc}"
            if result is None:
                result = {"status": "aborted" if state == "aborted" else "failed", "error": error}
            result.update({"protocol": P.PROTOCOL_VERSION, "type": "result", "job_id": job_id, "state": state,
                           "error": error, "sandbox": self.sandbox})
            result.setdefault("artifact_sha256", self.journal.get(job_id)["artifact_sha256"])  # a failed run's too
            self.journal.finish(job_id, state, result, error)
            self._prune()

    def _prune(self) -> None:
        """Forget finished jobs past the retention (AgentConfig keep_jobs / keep_job_days) and their directories."""
        try:
            for job_id in self.journal.prune(self.cfg.keep_jobs, self.cfg.keep_job_days * 86400):
                shutil.rmtree(self.data_dir / "jobs" / job_id, ignore_errors=True)
        except Exception as exc:  # retention must never stop the worker
            sys.stderr.write(f"edgeq-agent: pruning old jobs failed: {exc!r}\n")

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def stop(self) -> None:
        """Kill a running job (it becomes aborted) and stop the worker."""
        self._stopping.set()
        self._kill()
        self._queue.put(None)
        self._worker.join(timeout=10)
        self.journal.recover()
        self.journal.close()

    def result(self, job_id: str) -> dict:
        job = self.journal.get(job_id)
        if job is None:
            raise P.ProtocolError(f"job_id: {job_id!r} is not known to this agent", 404)
        if job["state"] not in P.FINAL_STATES:
            raise P.ProtocolError(f"job {job_id!r} is {job['state']}; no result yet", 409)
        if job["result"] is None:
            return {"protocol": P.PROTOCOL_VERSION, "type": "result", "job_id": job_id,
                    "state": job["state"], "status": job["state"], "error": job["error"]}
        return job["result"]
