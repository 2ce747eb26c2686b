"""`edgeq recipes`: the built-in recipes."""

from __future__ import annotations

import click

from .common import emit_json, json_option


@click.command()
@json_option
def recipes(as_json):
    """List the built-in recipes (use a name with `edgeq quantize --recipe`)."""
    from ..recipe import load_recipe, preset_names

    rows = []
    for name in preset_names():
        r = load_recipe(name)
        active = [x for x in r.rules if not x.skip]
        main = active[-1] if active else None
        rows.append({
            "name": name,
            "weights": main.weight.name if main else "float",
            "activations": f"{main.activation.mode}{main.activation.bits if main.activation.quantized else ''}" if main else "float",
            "method": main.method if main else "-",
            "calibration": r.needs_calibration,
            "description": r.description,
        })
    if as_json:
        emit_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['weights']:<10} act={r['activations']:<9} {r['method']:<6} {r['description']}")
    click.echo(f"{'auto':<{width}}  mixed precision from layer sensitivity under --budget for --target (edgeq quantize --recipe auto)")
