"""`edgeq demo`: the main job end to end on built-in defaults."""

from __future__ import annotations

from pathlib import Path

import click

from .common import progress


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Model reference (tiny-llama for a one-minute run).")
@click.option("--out", "out", default="demo-out", show_default=True, type=click.Path(), help="Working directory (reused: finished quantizations are kept).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["onnx", "tflite"]), default=("onnx", "tflite"), show_default=True)
@click.option("--eval-windows", type=click.IntRange(1, 1000), default=8, show_default=True, help="Evaluation windows per variant.")
@click.option("--seq-len", type=click.IntRange(8, 4096), default=128, show_default=True, help="Tokens per window, TFLite graph length and profiled prefill length.")
@click.option("--runs", type=click.IntRange(1, 100000), default=50, show_default=True, help="Minimum timed runs per file on the local agent.")
def demo(model, out, formats, eval_windows, seq_len, runs):
    """Quantize MODEL to INT8 and INT4, export ONNX and TFLite, evaluate, profile locally, report."""
    from ..demo import format_table, run_demo

    rows, report = run_demo(model, Path(out), formats=formats, eval_windows=eval_windows, runs=runs, seq_len=seq_len,
                            say=lambda m: click.echo(m, err=True), progress=progress)
    click.echo(format_table(rows))
    click.echo(f"report: {report.resolve()}")
