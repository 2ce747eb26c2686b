"""`edgeq agent serve`: the board-side agent. Imports nothing heavy (no torch)."""

from __future__ import annotations

from pathlib import Path

import click


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
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=None,
              help="Largest artifact file accepted (default 1024).")
@click.option("--max-store-gb", type=click.FloatRange(0, min_open=True), default=8.0, show_default=True,
              help="Uploaded files kept for re-use; past it the least recently used are evicted (never those a queued "
                   "or running job needs).")
@click.option("--min-free-mb", type=click.IntRange(0), default=512, show_default=True,
              help="Refuse an upload that would leave the disk with less free space.")
@click.option("--max-job-seconds", type=click.FloatRange(0, min_open=True), default=900.0, show_default=True,
              help="Wall-time limit per job.")
@click.option("--max-memory-mb", type=click.IntRange(64), default=None, help="Address-space limit per job (default 80% of RAM).")
@click.option("--power-meter", default="auto", show_default=True,
              help="auto, none, jetson-ina3221, rpi5-pmic, hwmon, rapl, or command:<cmd printing watts>.")
@click.option("--sysfs-root", default="/", hidden=True, help="Read sensors under this root (tests: recorded trees).")
def serve(host, port, token_file, tls_cert, tls_key, client_ca, data_dir, max_upload_mb, max_store_gb, min_free_mb,
          max_job_seconds, max_memory_mb, power_meter, sysfs_root) -> None:
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
        sysfs_root=sysfs_root)
    mode = Path(token_file).stat().st_mode & 0o777
    if mode & 0o007:  # as ssh says of a private key: anyone who reads the token can run models on this board
        click.echo(f"edgeq-agent: WARNING: token file {token_file} is open to every user (mode {mode:03o}); "
                   "chmod 600 it (or 640 with the agent's group, as the board installers do)", err=True)
    run(cfg)
