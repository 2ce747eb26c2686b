"""`edgeq report`: variants x boards from the results database as HTML, Markdown or JSON."""

from __future__ import annotations

import click

from ..errors import EdgeqError
from .common import check_new_output

RUN_ID = click.IntRange(1, 2**63 - 1)  # an SQLite row id


@click.command()
@click.option("--db", type=click.Path(dir_okay=False), help="Results database (default: $EDGEQ_DB or user data dir).")
@click.option("--model", help="Only this model reference.")
@click.option("--device", help="Only this device.")
@click.option("--since", help="Only runs stored at or after this ISO-8601 date/time (UTC if no zone).")
@click.option("--force", is_flag=True, help="Compare runs whose envelopes differ (or are INVALID); marked as forced.")
@click.option("--compare", nargs=2, type=RUN_ID, metavar="RUN_A RUN_B", help="Compare two stored runs (result ids).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="report.html | report.md | report.json")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never the results database).")
def report(db, model, device, since, force, compare, output, overwrite) -> None:
    """Write a report of every variant and board in the database (or compare two runs)."""
    from .. import report as rep

    if output:
        rep.check_not_db(db, output)
        check_new_output(output, overwrite)
    if compare:
        if output:
            click.echo(str(rep.write_compare(db, compare[0], compare[1], output)))
        else:
            click.echo(rep.render_compare(db, compare[0], compare[1], "md"), nl=False)
        return
    if not output:
        raise EdgeqError("report: -o/--output is required (report.html, report.md or report.json)")
    click.echo(str(rep.write_report(db, output, model=model, device=device, since=since, force=force)))
    _notes(db, model, device)


def _notes(db, model: str | None, device: str | None) -> None:
    """Said on stderr after the report: stored rows left out because they are damaged, and a --model or --device that
    no stored run has (a typo), with the ones there are."""
    from ..store import damage_note, list_evals, list_results

    rows = list_results(db)
    for kind, recs in (("result", rows), ("eval", list_evals(db))):
        for rec in recs:
            if rec.damaged:
                click.echo(f"edgeq: note: {kind} {rec.id} is damaged ({damage_note(rec)}); left out of the report",
                           err=True)
    _unknown_filters(rows, model, device)


def _unknown_filters(rows, model: str | None, device: str | None) -> None:
    for flag, value, known in (("--model", model, {r.model_ref for r in rows if r.model_ref}),
                               ("--device", device, {r.device for r in rows})):
        if value and value not in known:
            click.echo(f"edgeq: note: {flag} {value!r} matches no stored run (the database has: "
                       f"{', '.join(sorted(known)) or 'none'})", err=True)
