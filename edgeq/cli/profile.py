"""`edgeq profile`: measure exported files on one or more boards (or a local agent) and store them."""

from __future__ import annotations

import json
import sys

import click

from ..agent.protocol import MAX_DIM, NUMERIC_LIMITS
from ..errors import EdgeqError
from .common import check_results_db


def _progress_printer():
    last: dict[tuple[str, str], str] = {}

    def show(device: str, artifact: str, job: dict) -> None:
        state = job.get("state", "")
        prog = job.get("progress") or {}
        line = f"{state} {prog.get('phase', '')} {prog.get('runs', '') or ''}".strip()
        if last.get((device, artifact)) != line:
            last[(device, artifact)] = line
            click.echo(f"[{device}] {artifact}: {line}", err=True)

    return show


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--device", "devices", multiple=True, help="Device name (devices file) or agent URL; repeatable.")
@click.option("--local", is_flag=True, help="Start an agent on 127.0.0.1 with a fresh token and use it.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), help="Bearer token for URL devices.")
@click.option("--devices-file", type=click.Path(dir_okay=False), help="Devices TOML (default: user config dir).")
@click.option("--runs", type=click.IntRange(*NUMERIC_LIMITS["runs"]), default=50, show_default=True, help="Minimum timed runs.")
@click.option("--min-seconds", type=click.FloatRange(*NUMERIC_LIMITS["min_seconds"]), default=1.0, show_default=True,
              help="Minimum timed duration.")
@click.option("--threads", type=click.IntRange(*NUMERIC_LIMITS["threads"]), default=1, show_default=True, help="Runtime threads.")
@click.option("--dim", "dims", multiple=True, help="Symbolic input dim, NAME=SIZE (e.g. sequence=128; slots=64: the cache "
              "slots a TFLite decode step holds, with --signature decode).")
@click.option("--signature", default=None, help="TFLite: the signature to time, e.g. decode (a decoder LM's KV-cache step).")
@click.option("--weight-cache", is_flag=True,
              help="TFLite: load through LiteRT's CompiledModel with XNNPACK's weight cache in memory, so a file's "
                   "signatures share one packed copy of each weight (the Interpreter, the default, packs one per signature).")
@click.option("--no-output-check", "no_output_check", is_flag=True,
              help="Do not run each file on this host too to compare the board's outputs with this host's (the board "
                   "digests its outputs either way).")
@click.option("--db", type=click.Path(dir_okay=False), help="Results database (default: $EDGEQ_DB or user data dir).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def profile(artifacts, devices, local, token_file, devices_file, runs, min_seconds, threads, dims, signature,
            weight_cache, no_output_check, db, as_json) -> int:
    """Profile ARTIFACTS (.onnx / .tflite) on boards in parallel; results go to the database."""
    from ..agent import host
    from ..agent.protocol import check_config

    if bool(devices) == bool(local):
        raise EdgeqError("profile: give either --device (one or more) or --local")
    try:
        dim_map = {k: int(v) for k, v in (d.split("=", 1) for d in dims)}
    except ValueError:
        raise EdgeqError(f"--dim: expected NAME=SIZE, got {list(dims)}") from None
    for name, size in dim_map.items():
        if not 1 <= size <= MAX_DIM:
            raise EdgeqError(f"--dim {name}={size}: a size is an integer in [1, {MAX_DIM}]")
    if signature is not None and any(not str(a).endswith(".tflite") for a in artifacts):
        raise EdgeqError("profile: --signature applies to .tflite files (an ONNX decode step is its own FILE.decode.onnx)")
    if weight_cache and any(not str(a).endswith(".tflite") for a in artifacts):
        raise EdgeqError("profile: --weight-cache applies to .tflite files (XNNPACK's weight cache in LiteRT)")
    check_results_db(db)  # before any board spends time on a run that could not be stored
    config = check_config({"runs": runs, "min_seconds": min_seconds, "threads": threads, "dims": dim_map,
                           "max_seconds": max(60.0, min_seconds * 4), "signature": signature,
                           "weight_cache": weight_cache})
    progress = None if as_json and not sys.stderr.isatty() else _progress_printer()
    if local:
        with host.LocalAgent() as agent:
            summaries = host.profile(artifacts, [agent.device()], config, db, on_progress=progress,
                                     check_outputs=not no_output_check, strict_dims=True)
    else:
        summaries = host.profile(artifacts, host.resolve_devices(list(devices), token_file, devices_file),
                                 config, db, on_progress=progress, check_outputs=not no_output_check, strict_dims=True)
    if as_json:
        click.echo(json.dumps(summaries, indent=1, default=str))
    else:
        click.echo(host.summary_table(summaries))
    return 0 if all(s["status"] in ("valid", "invalid") for s in summaries) else 1
