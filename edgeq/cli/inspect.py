"""`edgeq inspect QDIR`: the per-layer decisions of a quantized model."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import size_text
from ..errors import EdgeqError
from .common import emit_json, json_option


@click.command()
@click.argument("target")
@click.option("--activations", is_flag=True, help="Measure per-layer input kurtosis and the W4A16/W16A4/W4A4 error split.")
@click.option("--calib", default=None, help="Data for --activations (default enwiki / images).")
@json_option
def inspect(target, activations, calib, as_json):
    """Show TARGET's per-layer bits, groups, activation modes and sizes (TARGET: a QDIR, or a model with --activations)."""
    from ..fileio import damaged_fields, read_json
    from ..quantize.qmodel import is_qdir

    if activations:
        from ..quantize.diagnostics import activation_report, format_diagnostics

        report = activation_report(target, calib=calib)
        if as_json:
            emit_json(report)
        else:
            click.echo(format_diagnostics(report))
        return
    if not is_qdir(target):
        missing = [n for n in ("quant.json", "layers.safetensors") if not (Path(target) / n).is_file()]
        raise EdgeqError(f"inspect: {target!r} is not a quantized-model directory (no {' or '.join(missing)})")
    summary = read_json(Path(target) / "quant.json")
    if as_json:
        emit_json(summary)
        return
    with damaged_fields(f"inspect: {Path(target) / 'quant.json'}", "quantize again"):
        lines = _summary_lines(summary)  # all or nothing: a damaged field prints no half table
    click.echo("\n".join(lines))


def _summary_lines(summary: dict) -> list[str]:
    """quant.json as a table: the totals, a row per layer, the float convolutions and what TFLite holds exactly."""
    lines = [f"{summary['model']}  recipe={summary['recipe']}  avg_bits={summary['avg_bits']}  "
             f"{size_text(summary['bytes_before'])} -> {size_text(summary['bytes_after'])} "
             f"({100 * summary['size_reduction']:.1f}% smaller)"]
    name_w = max([len(layer["name"]) for layer in summary["layers"]] + [5])
    lines.append(f"{'layer':<{name_w}}  {'shape':>11}  {'weights':<10} {'act':<9} {'method':<6} {'gamma':>5} {'bytes':>10}")
    for layer in summary["layers"]:
        w, a = layer["weight"], layer["activation"]
        g = {"tensor": "t", "channel": "c"}.get(w["granularity"], f"g{w['group_size']}")
        wname = f"w{w['bits']}{'s' if w['symmetric'] else 'a'}-{g}"
        act = f"{a['mode']}{a['bits'] if a['mode'] != 'none' else ''}"
        shape = "x".join(str(s) for s in layer["shape"][:2])
        lines.append(f"{layer['name']:<{name_w}}  {shape:>11}  {wname:<10} {act:<9} {layer['method']:<6} {layer['gamma']:>5.2f} {layer['bytes_quant']:>10}")
    mixed = summary.get("mixed") or {}
    kept, left = mixed.get("convolutions_kept_float") or [], mixed.get("convolutions_left_float") or {}
    if kept or left.get("count"):  # `--recipe auto` on a CNN: the float convolutions, which the table does not list
        lines.append(f"float: {len(kept)} convolution{'s' * (len(kept) != 1)} kept by the plan"
                     + (f" ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})" if kept else "")
                     + (f"; {left['count']} that no plan quantizes ({left['why']})" if left.get("count") else ""))
    tflite = summary.get("tflite")  # QDIRs saved before quant.json said so have none
    if tflite:
        held = [v for v, r in tflite["variants"].items() if r["representable"]]
        lines.append(f"TFLite: grids held as they are by --variant {', '.join(held) or 'none'} "
                     f"(default {tflite['default_variant']}); the others' reasons: edgeq inspect --json, key tflite")
    return lines
