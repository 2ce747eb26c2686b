"""`edgeq agent serve`: the board-side agent; `edgeq agent info`: what a board's agent says of itself (from the host).
Imports nothing heavy (no torch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from ..errors import EdgeqError


class PositiveFinite(click.ParamType):
    """A number above 0 and finite: click.FloatRange lets NaN through (every comparison with it is false)."""

    name = "number"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{value!r} must be a finite number above 0", param, ctx)
        return number


@click.group()
def agent() -> None:
    """The on-device agent that profiles artifacts for a host."""


@agent.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for all).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="TCP port; 0 picks a free one.")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False), help="File holding the bearer token.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
@click.option("--client-ca", type=click.Path(exists=True, dir_okay=False),
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Jobs, artifacts and the journal (default: the user data dir).")
@click.option("--max-upload-mb", type=PositiveFinite(), default=None,
              help="Largest artifact file accepted (default 1024).")
@click.option("--max-store-gb", type=PositiveFinite(), default=8.0, show_default=True,
              help="Uploaded files kept for re-use; past it the least recently used are evicted (never those a queued "
                   "or running job needs).")
@click.option("--min-free-mb", type=click.IntRange(0), default=512, show_default=True,
              help="Refuse an upload that would leave the disk with less free space.")
@click.option("--max-job-seconds", type=PositiveFinite(), default=900.0, show_default=True,
              help="Wall-time limit per job.")
@click.option("--max-memory-mb", type=click.IntRange(64), default=None, help="Address-space limit per job (default 80% of RAM).")
@click.option("--power-meter", default="auto", show_default=True,
              help="auto, none, jetson-ina3221, rpi5-pmic, hwmon, rapl, or command:<cmd printing watts>.")
@click.option("--keep-jobs", type=click.IntRange(1), default=1000, show_default=True,
              help="Finished jobs remembered (journal rows and directories), newest first; older ones are forgotten.")
@click.option("--keep-job-days", type=PositiveFinite(), default=30.0, show_default=True,
              help="Forget finished jobs older than this.")
@click.option("--sandbox", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Run each job in Linux namespaces: read-only files, no network or Unix sockets, nothing of the "
                   "agent's data but its own directory, the token and TLS key hidden (docs/agent.md 'Sandbox'). "
                   "auto: when this kernel allows it; on: refuse to start without it.")
@click.option("--sandbox-hide", multiple=True, type=click.Path(exists=True),
              help="Also hide this file or directory from jobs (e.g. ~/.ssh); repeatable.")
@click.option("--sysfs-root", default="/", hidden=True, help="Read sensors under this root (tests: recorded trees).")
def serve(host, port, token_file, tls_cert, tls_key, client_ca, data_dir, max_upload_mb, max_store_gb, min_free_mb,
          max_job_seconds, max_memory_mb, power_meter, keep_jobs, keep_job_days, sandbox, sandbox_hide,
          sysfs_root) -> None:
    """Serve protocol v1 until SIGTERM; prints 'EDGEQ_AGENT_LISTENING <url>' when ready."""
    from ..agent import protocol
    from ..agent.server import AgentConfig, read_token_file, serve as run

    if data_dir is None:
        import platformdirs

        data_dir = Path(platformdirs.user_data_dir("edgeq", appauthor=False)) / "agent"
    cfg = AgentConfig(
        token=read_token_file(token_file), data_dir=Path(data_dir), host=host, port=port,
        tls_cert=Path(tls_cert) if tls_cert else None, tls_key=Path(tls_key) if tls_key else None,
        client_ca=Path(client_ca) if client_ca else None,
        max_upload_bytes=protocol.DEFAULT_MAX_UPLOAD_BYTES if max_upload_mb is None else int(max_upload_mb * (1 << 20)),
        max_store_bytes=int(max_store_gb * (1 << 30)), min_free_bytes=min_free_mb << 20,
        max_job_seconds=max_job_seconds, max_memory_mb=max_memory_mb, power_meter=power_meter,
        keep_jobs=keep_jobs, keep_job_days=keep_job_days, sandbox=sandbox,
        sandbox_hide=tuple(Path(p) for p in (token_file, tls_key, *sandbox_hide) if p),
        sysfs_root=sysfs_root)
    check_serve(cfg)
    mode = Path(token_file).stat().st_mode & 0o777
    if mode & 0o007:  # as ssh says of a private key: anyone who reads the token can run models on this board
        click.echo(f"edgeq-agent: WARNING: token file {token_file} is open to every user (mode {mode:03o}); "
                   "chmod 600 it (or 640 with the agent's group, as the board installers do)", err=True)
    run(cfg)


def check_serve(cfg) -> None:
    """What `serve` would otherwise fail on after it started, as one line naming the option: the TLS files load, the
    data dir can be written, and the address resolves and binds (the server binds as it does here, reusing a
    TIME_WAIT address)."""
    import errno
    import socket
    import ssl
    import tempfile

    if cfg.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        except (ssl.SSLError, OSError) as exc:
            raise EdgeqError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: do not load as a PEM certificate "
                             f"and its private key ({getattr(exc, 'reason', None) or exc})") from None
        if cfg.client_ca:
            try:
                ctx.load_verify_locations(str(cfg.client_ca))
            except (ssl.SSLError, OSError) as exc:
                raise EdgeqError(f"--client-ca {cfg.client_ca}: does not load as PEM CA certificates "
                                 f"({getattr(exc, 'reason', None) or exc})") from None
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cfg.data_dir):
            pass
    except OSError as exc:
        raise EdgeqError(f"--data-dir {cfg.data_dir}: cannot be written ({exc.strerror or exc})") from None
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET  # as AgentServer chooses
    try:
        socket.getaddrinfo(cfg.host, cfg.port, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise EdgeqError(f"--host {cfg.host}: not an address or a name that resolves "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EdgeqError(f"--port {cfg.port}: already in use on {cfg.host} (another agent? choose another "
                                 "port, or 0 for a free one)") from None
            raise EdgeqError(f"--host {cfg.host} --port {cfg.port}: cannot listen there "
                             f"({exc.strerror or exc})") from None


@agent.command("info")
@click.option("--device", "devices", multiple=True, required=True, help="Device name (devices file) or agent URL; repeatable.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), help="Bearer token for URL devices.")
@click.option("--devices-file", type=click.Path(dir_okay=False), help="Devices TOML (default: user config dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the agents' info documents as JSON.")
def info(devices, token_file, devices_file, as_json) -> int:
    """Ask each board's agent what it runs: edgeq and runtime versions (what a file's runtime_min is held against),
    CPU, memory, power meter and limits. Checks the URL, token and TLS settings before a profile run; exit 1 if an
    agent cannot be reached or refuses."""
    from ..agent.client import AgentError
    from ..agent.host import resolve_devices

    answers = []
    for dev in resolve_devices(list(devices), token_file, devices_file):
        try:
            answers.append({"device": dev.name, "url": dev.url, "info": dev.client(timeout=15.0).info(), "error": None})
        except AgentError as exc:
            answers.append({"device": dev.name, "url": dev.url, "info": None, "error": str(exc)})
    if as_json:
        click.echo(json.dumps(answers, indent=1))
    else:
        for a in answers:
            click.echo("\n".join(_info_lines(a)))
    return 1 if any(a["error"] for a in answers) else 0


def _info_lines(answer: dict) -> list[str]:
    head = f"{answer['device']}" + (f" ({answer['url']})" if answer["url"] != answer["device"] else "")
    if answer["error"]:
        return [f"{head}: error: {answer['error']}"]
    info, fp = answer["info"], answer["info"].get("fingerprint") or {}
    runtimes = ", ".join(f"{name} {version or '-'}" for name, version in (fp.get("runtimes") or {}).items()
                         if name not in ("numpy", "psutil", "edgeq"))
    meter = info.get("power_meter")
    power = f"{meter.get('meter')} ({meter.get('scope')})" if meter else f"none ({info.get('power_reason')})"
    sandbox = info.get("sandbox") or f"none ({info.get('sandbox_reason') or 'this agent does not say: an older edgeq'})"
    mem, upload = info.get("max_memory_mb"), info.get("max_upload_bytes")
    os_name = (fp.get("os") or "-").split("=", 1)[-1].strip('"')  # /etc/os-release's first line, PRETTY_NAME="..."
    return [f"{head}: edgeq {info.get('version') or '?'}, protocol {info.get('protocol')}",
            f"  board:    {fp.get('board') or '-'}; {fp.get('cpu_model') or '-'} x{fp.get('cpu_count')} ({fp.get('machine')}), "
            f"{fp.get('mem_total_mb')} MB; {os_name}, kernel {fp.get('kernel')}, Python {fp.get('python')}",
            f"  runtimes: {runtimes}",
            f"  power:    {power}",
            f"  sandbox:  {sandbox}",
            f"  limits:   upload {'?' if upload is None else upload >> 20} MB, job {info.get('max_job_seconds')} s, "
            f"memory {f'{mem} MB' if mem else 'default'}"]
