"""`edgeq report`: variants x boards from the results database as HTML, Markdown or JSON."""

from __future__ import annotations

import click

from ..errors import EdgeqError
from .common import check_writable_parent


@click.command()
@click.option("--db", type=click.Path(dir_okay=False), help="Results database (default: $EDGEQ_DB or user data dir).")
@click.option("--model", help="Only this model reference.")
@click.option("--device", help="Only this device.")
@click.option("--since", help="Only runs stored at or after this ISO-8601 date/time (UTC if no zone).")
@click.option("--force", is_flag=True, help="Compare runs whose envelopes differ (or are INVALID); marked as forced.")
@click.option("--compare", nargs=2, type=int, metavar="RUN_A RUN_B", help="Compare two stored runs (result ids).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="report.html | report.md | report.json")
def report(db, model, device, since, force, compare, output) -> None:
    """Write a report of every variant and board in the database (or compare two runs)."""
    from .. import report as rep

    if output:
        check_writable_parent(output)
    if compare:
        if output:
            click.echo(str(rep.write_compare(db, compare[0], compare[1], output)))
        else:
            click.echo(rep.render_compare(db, compare[0], compare[1], "md"), nl=False)
        return
    if not output:
        raise EdgeqError("report: -o/--output is required (report.html, report.md or report.json)")
    click.echo(str(rep.write_report(db, output, model=model, device=device, since=since, force=force)))
    _unknown_filters(db, model, device)


def _unknown_filters(db, model: str | None, device: str | None) -> None:
    """A --model or --device that no stored run has (a typo) is said on stderr, with the ones there are."""
    from ..store import list_results

    if not model and not device:
        return
    rows = list_results(db)
    for flag, value, known in (("--model", model, {r.model_ref for r in rows if r.model_ref}),
                               ("--device", device, {r.device for r in rows})):
        if value and value not in known:
            click.echo(f"edgeq: note: {flag} {value!r} matches no stored run (the database has: "
                       f"{', '.join(sorted(known)) or 'none'})", err=True)
