"""`edgeq results list|show`: read the results database."""

from __future__ import annotations

import json

import click

from ..console import aligned

MAX_LIMIT = 1_000_000


@click.group()
def results() -> None:
    """Stored profiling results."""


@results.command("list")
@click.option("--db", type=click.Path(dir_okay=False), help="Results database (default: $EDGEQ_DB or user data dir).")
@click.option("--artifact", help="Only this artifact sha256 (a prefix is enough).")
@click.option("--device", help="Only this device.")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(db, artifact, device, limit, as_json) -> None:
    """One line per stored result, newest first."""
    from .. import store

    store.require_db(db)
    rows = store.list_results(db, artifact_sha256=artifact, device=device, limit=limit)
    for r in rows:
        if r.damaged:
            click.echo(f"edgeq: note: result {r.id} is damaged ({store.damage_note(r)}); its other columns are listed",
                       err=True)
    if as_json:
        keep = lambda r: {k: v for k, v in r.to_dict().items() if k not in ("result", "export_json")}  # noqa: E731
        click.echo(json.dumps([keep(r) for r in rows], indent=1))
        return
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    header = ["id", "created", "device", "artifact", "variant", "status", "p50 ms", "p99 ms", "n", "runtime", "mJ/inf"]
    cells = [[str(r.id), r.created, r.device, r.artifact_sha256[:12], r.variant or "-", r.status, fmt(r.p50_ms),
              fmt(r.p99_ms), str(r.n_runs or 0), r.runtime or "-", fmt(r.energy_mj)] for r in rows]
    for line in aligned(header, cells, right={"id", "p50 ms", "p99 ms", "n", "mJ/inf"}):
        click.echo(line)


@results.command("show")
@click.argument("result_id", type=click.IntRange(1, 2**63 - 1))
@click.option("--db", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.option("--raw", is_flag=True, help="Include every raw latency.")
def show(result_id, db, as_json, raw) -> None:
    """Everything stored for one result."""
    from .. import store

    rec = store.get_result(db, result_id).to_dict()
    if not raw and rec.get("result") and rec["result"].get("latency_ms"):
        rec["result"]["latency_ms"].pop("raw", None)
    if as_json:
        click.echo(json.dumps(rec, indent=1))
        return
    for key, value in rec.items():
        if key in ("result", "export_json", "fingerprint"):
            continue
        click.echo(f"{key:<20} {value}")
    click.echo(f"{'fingerprint':<20} {json.dumps(rec['fingerprint'], sort_keys=True)[:400]}")
