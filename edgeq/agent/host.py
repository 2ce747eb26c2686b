"""Profiling from the host: devices file, a local agent, and artifacts x boards in parallel.

The devices file (TOML; `--devices PATH`, else `$EDGEQ_DEVICES`, else
`<user config dir>/edgeq/devices.toml`) names boards:

    [devices.pi5]
    url = "https://pi5.local:8765"
    token_file = "~/.config/edgeq/pi5.token"
    ca_file = "~/.config/edgeq/pi5-ca.pem"          # optional: the agent's CA (or self-signed cert)
    client_cert = "~/.config/edgeq/host.pem"       # optional: mutual TLS
    client_key = "host.key"                          # a relative path is the devices file's neighbour

Boards run in parallel (one thread each); artifacts on one board run one after the other.
A result is stored only once the agent has returned it whole; a lost connection stores nothing.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..console import aligned
from ..errors import EdgeqError
from ..export.runtime_min import runtime_for, runtime_verdict
from . import outputs
from .bundles import Bundle, bundle, check_dims, check_signature, check_tflite_signature, job_meta
from .client import AgentClient, AgentError, check_url
from .inputs import asked_dims, dims_label
from .server import READY_PREFIX, read_token_file

ENV_DEVICES = "EDGEQ_DEVICES"
_DEVICE_KEYS = {"url", "token_file", "ca_file", "client_cert", "client_key"}
_PATH_KEYS = _DEVICE_KEYS - {"url"}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    url: str
    token_file: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def client(self, token: str | None = None, timeout: float = 30.0) -> AgentClient:
        if token is None:
            if not self.token_file:
                raise EdgeqError(f"device {self.name}: no token (give --token-file or token_file in the devices file)")
            token = read_token_file(Path(self.token_file).expanduser())
        exp = lambda p: str(Path(p).expanduser()) if p else None  # noqa: E731
        return AgentClient(self.url, token, ca_file=exp(self.ca_file), client_cert=exp(self.client_cert),
                           client_key=exp(self.client_key), timeout=timeout)


def devices_path(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path).expanduser()
    if os.environ.get(ENV_DEVICES):
        return Path(os.environ[ENV_DEVICES]).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("edgeq", appauthor=False)) / "devices.toml"


def load_devices(path: str | os.PathLike | None = None) -> dict[str, Device]:
    """Devices by name from the devices file; {} if the default file does not exist."""
    p = devices_path(path)
    if not p.exists():
        if path:
            raise EdgeqError(f"devices file: {p} does not exist")
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EdgeqError(f"devices file: {p}: {exc}") from None
    unknown_top = set(data) - {"devices"}
    if unknown_top:
        raise EdgeqError(f"devices file: {p}: unknown top-level keys {sorted(unknown_top)}; allowed: ['devices']")
    out = {}
    devices = data.get("devices") or {}
    if not isinstance(devices, dict):
        raise EdgeqError(f"devices file: {p}: 'devices' must be a table of [devices.NAME] entries")
    for name, entry in devices.items():
        if not isinstance(entry, dict) or set(entry) - _DEVICE_KEYS or "url" not in entry:
            raise EdgeqError(f"devices file: {p}: device {name!r} needs 'url' and allows only {sorted(_DEVICE_KEYS)}")
        bad = [k for k, v in entry.items() if not isinstance(v, str)]
        if bad:
            raise EdgeqError(f"devices file: {p}: device {name!r}: {bad[0]} = {entry[bad[0]]!r} must be a string")
        check_url(entry["url"], f"{name!r} in {p}")
        # as kubeconfig does: a relative path is read from the file's directory, not wherever edgeq runs
        paths = {k: str(p.parent / Path(v).expanduser()) for k, v in entry.items() if k in _PATH_KEYS}
        out[name] = Device(name=name, **{**entry, **paths})
    return out


def resolve_devices(specs: list[str], token_file: str | None, devices_file: str | None) -> list[Device]:
    """NAME (from the devices file) or URL -> Device; --token-file overrides the file's token."""
    known = load_devices(devices_file)
    out = []
    for spec in specs:
        if "://" in spec:
            dev = Device(name=spec, url=check_url(spec), token_file=token_file)
        elif spec in known:
            dev = known[spec]
            if token_file:
                dev = dataclasses.replace(dev, token_file=token_file)
        else:
            raise EdgeqError(f"device: {spec!r} is neither a URL nor a name in {devices_path(devices_file)} "
                             f"(known: {', '.join(sorted(known)) or 'none'})")
        out.append(dev)
    return out


ProgressFn = Callable[[str, str, dict], None]


def profile_on(device: Device, client: AgentClient, bundles: list[Bundle], config: dict,
               on_progress: ProgressFn | None = None) -> list[tuple[Bundle, dict | None, str | None]]:
    """Run every bundle on one device, in order; (bundle, result or None, error or None) each. A file whose FILE.json
    rules out the runtime the agent's /v1/info names is not sent (`not_sent`): the agent would refuse it after the
    upload, which for a 500 MB file over a board's Wi-Fi is minutes."""
    out = []
    try:
        info = client.info()
    except AgentError as exc:
        return [(b, None, f"not run: {exc}") for b in bundles]
    for b in bundles:
        job_id = f"{b.sha256[:12]}-{uuid.uuid4().hex[:12]}"
        refused = not_sent(b, info, config)
        if refused is not None:
            out.append((b, refused, None))
            continue
        try:
            if on_progress:
                on_progress(device.name, b.path.name, {"state": "uploading"})
            client.upload(b.path, b.sha256)
            for f, sha in b.files:
                client.upload(f, sha)
            client.submit(job_id, {"name": b.path.name, "sha256": b.sha256},
                          [{"name": f.name, "sha256": sha} for f, sha in b.files], job_meta(b.meta, config.get("signature")), config)
            result = client.wait(job_id, on_progress=(lambda job, n=b.path.name: on_progress(device.name, n, job))
                                 if on_progress else None)
            out.append((b, result, None))
        except AgentError as exc:
            out.append((b, None, str(exc)))
            if exc.status is None:  # the agent is gone: the rest would fail the same way
                for rest in bundles[len(out):]:
                    out.append((rest, None, f"not run: {exc}"))
                break
    return out


def not_sent(b: Bundle, info: dict, config: dict) -> dict | None:
    """The failed result of a file the agent's runtime cannot run by its FILE.json's runtime_min (`runtime_verdict`, as
    the agent itself would decide before loading it), or None to send it."""
    fp = info.get("fingerprint") or {}
    meta = b.meta if (b.meta or {}).get("sha256") == b.sha256 else None
    dist, version = runtime_for(b.path.suffix, bool(config.get("weight_cache")), fp.get("runtimes") or {})
    verdict = runtime_verdict(meta, dist, version)
    if verdict is None or verdict["support"] != "unsupported":
        return None
    return {"status": "failed", "artifact_sha256": b.sha256, "format": b.path.suffix.lstrip("."), "config": config,
            "fingerprint": fp, "error": f"runtime: {verdict['why']}; {verdict['fix']} on the board (not sent: the "
                                        f"agent's /v1/info names {dist} {version})"}


def profile(artifacts: list[str | os.PathLike], devices: list[Device], config: dict, db: str | None,
            tokens: dict[str, str] | None = None, on_progress: ProgressFn | None = None,
            timeout_s: float = 30.0, check_outputs: bool = True, strict_dims: bool = False) -> list[dict]:
    """Profile artifacts on devices in parallel and store every returned result.

    Returns one summary per (device, artifact): device, artifact, status, error, row id, result.
    `timeout_s` is the per-request network timeout (not the job's duration). `check_outputs`: run each file here too,
    on the board's inputs, and store how the board's outputs compare (`output_check` in the result). `strict_dims`:
    refuse a config dim no input has (`check_dims`) rather than let the result warn of it.
    """
    from .. import store

    bundles = [bundle(a) for a in artifacts]
    for b in bundles:
        check_signature(b, config.get("signature"))
        check_tflite_signature(b, config.get("signature"))
    if strict_dims:
        check_dims(bundles, config.get("dims") or {}, config.get("signature"))
    clients = {d.name: d.client((tokens or {}).get(d.name), timeout=timeout_s) for d in devices}
    lock, references_lock, references = threading.Lock(), threading.Lock(), {}
    summaries: list[dict] = []

    def run(dev: Device) -> None:
        for b, result, error in profile_on(dev, clients[dev.name], bundles, config, on_progress):
            row = None
            if result is not None:  # a failure is stored too (what a board cannot run), tied to the file sent
                result = {**result, "artifact_sha256": result.get("artifact_sha256") or b.sha256}
                try:
                    checked = outputs.output_check(b.path, b.sha256, result, references, references_lock) \
                        if check_outputs else None
                    if checked is not None:
                        result["output_check"] = checked
                    row = store.record_result(db, result, device=dev.name, device_url=dev.url,
                                              artifact_path=str(b.path.resolve()), export_meta=b.meta)
                except EdgeqError as exc:  # this row fails with the reason; the other boards' rows stand
                    result, error = None, f"not stored: {exc}"
            with lock:
                summaries.append({"device": dev.name, "artifact": str(b.path),
                                  "status": result.get("status") if result else "error",
                                  "error": error or (result or {}).get("error"), "row_id": row,
                                  "result": result})

    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        list(pool.map(run, devices))
    order = {(d.name, str(b.path)): i for i, (d, b) in enumerate((d, b) for d in devices for b in bundles)}
    return sorted(summaries, key=lambda s: order[(s["device"], s["artifact"])])


def profile_local(artifacts: list[str | os.PathLike], *, db: str | os.PathLike | None = None,
                  runs: int = 50, min_seconds: float = 1.0, threads: int = 1,
                  dims: dict[str, int] | None = None, signature: str | None = None,
                  on_progress: ProgressFn | None = None) -> list[dict]:
    """Start a local agent (loopback, port 0, fresh token), profile `artifacts`, stop it.

    The one call `edgeq demo` needs; results are stored in `db` (default: $EDGEQ_DB or the user
    data dir) and returned as summaries (see `profile`); `summary_table` prints them. `signature`
    times that signature of TFLite files (e.g. `decode`).
    """
    from .protocol import check_config

    config = check_config({"runs": runs, "min_seconds": min_seconds, "threads": threads, "signature": signature,
                           "dims": dims or {}, "max_seconds": max(60.0, min_seconds * 4)})
    with LocalAgent() as agent:
        return profile(artifacts, [agent.device()], config, None if db is None else str(db),
                       on_progress=on_progress)


def summary_table(summaries: list[dict]) -> str:
    """A plain-text table of `profile` summaries, each column as wide as its widest cell (a URL device and a long
    artifact name read whole): one line per (device, artifact), then errors, warnings and power notes."""
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    header = ["device", "artifact", "status", "p50 ms", "95% CI of median", "p99 ms", "n", "RSS MB",
              "runtime / provider", "mJ/inf", "outputs vs host"]
    right = {"p50 ms", "95% CI of median", "p99 ms", "n", "RSS MB", "mJ/inf"}
    rows, notes = [], []
    for s in summaries:
        r = s["result"] or {}
        lat = r.get("latency_ms") or {}
        ci = lat.get("ci95_median") or [None, None]
        rt = r.get("runtime") or {}
        p = r.get("power") or {}
        sig, dims = (r.get("config") or {}).get("signature"), asked_dims(r)
        name = Path(s["artifact"]).name + (f" [{sig}]" if sig else "") + dims_label(dims)
        rows.append([s["device"], name, s["status"], fmt(lat.get("p50")), f"[{fmt(ci[0])}, {fmt(ci[1])}]",
                     fmt(lat.get("p99")), str(lat.get("n", "-")), fmt(r.get("peak_rss_mb"), "{:.0f}"),
                     f"{rt.get('name', '-')} / {rt.get('provider', '-')}", fmt(p.get("energy_per_inference_mj")),
                     _agreement(r.get("output_check"))])
        if s["error"]:
            notes.append(f"{s['device']} {name}: error: {s['error']}")
        for reason in r.get("invalid_reasons") or []:
            notes.append(f"{s['device']} {name}: INVALID: {reason}")
        for warning in r.get("warnings") or []:
            notes.append(f"{s['device']} {name}: warning: {warning}")
        check = r.get("output_check")
        if check and not check.get("compared"):
            notes.append(f"{s['device']} {name}: outputs not compared: {check['why']}")
        elif check and not check["agrees"]:
            notes.append(f"{s['device']} {name}: warning: its outputs differ from {check['reference']}: cosine "
                         f"{check['cos_min']:.4f}, argmax agreement {_maybe(check['argmax_agree'])}: the board's runtime "
                         "does not compute what this host's does")
        if not s["error"] and p.get("reason"):
            notes.append(f"{s['device']} {name}: power: {p['reason']}")
    return "\n".join(aligned(header, rows, right) + sorted(set(notes)))


def _agreement(check: dict | None) -> str:
    """The summary's word for an output check: same, DIFFER, or - (not compared, or none)."""
    if not check or not check.get("compared"):
        return "-"
    return "same" if check["agrees"] else "DIFFER"


def _maybe(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Ask a child to exit (SIGTERM), and kill it if it has not within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalAgent:
    """`edgeq agent serve` on 127.0.0.1, port 0, with a fresh token, in a child process."""

    def __init__(self, data_dir: str | os.PathLike | None = None, extra_args: list[str] | None = None,
                 start_timeout_s: float = 60.0):
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeq-local-agent-")
        self.data_dir = Path(data_dir) if data_dir else Path(self._tmp.name) / "data"
        self.token = secrets.token_urlsafe(32)
        self.token_file = Path(self._tmp.name) / "token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        self.extra_args = extra_args or []
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> "LocalAgent":
        cmd = [sys.executable, "-m", "edgeq.cli.main", "agent", "serve", "--host", "127.0.0.1",
               "--port", "0", "--token-file", str(self.token_file), "--data-dir", str(self.data_dir),
               *self.extra_args]
        self.log_path = Path(self._tmp.name) / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, text=True)
        timer = threading.Timer(self.start_timeout_s, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line.startswith(READY_PREFIX):
            self.proc.wait()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            self.stop()
            raise EdgeqError(f"local agent: did not start (exit code {self.proc.returncode}): {' | '.join(tail)}")
        self.url = line.split()[1]
        return self

    def device(self) -> Device:
        return Device(name="local", url=self.url, token_file=str(self.token_file))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self._tmp.cleanup()

    def __enter__(self) -> "LocalAgent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
