"""`edgeq eval TARGET --task ppl|cosine|top1 [--data D] [--json]`."""

from __future__ import annotations

import click

from .common import check_results_db, emit_json, json_option


@click.command("eval")
@click.argument("target")
@click.option("--task", type=click.Choice(["ppl", "cosine", "top1"]), default=None, help="Default: ppl for LMs, cosine for encoders, top1 for image models.")
@click.option("--data", default=None,
              help="Evaluation data (evaluation half): enwiki, pydoc, images, a text file, an image folder or a .npy array.")
@click.option("--count", type=click.IntRange(1, 100000), default=None, help="Windows / sentences / images to evaluate.")
@click.option("--seq-len", type=click.IntRange(8, 32768), default=None,
              help="Window length for perplexity. Default: a fixed-shape file's own (TFLite), else 512.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True, help="Runtime threads for exported files.")
@click.option("--db", default=None, help="Also store the result in this results database (default: don't store).")
@json_option
def eval_cmd(target, task, data, count, seq_len, threads, db, as_json):
    """Evaluate TARGET: a model reference, a quantized-model directory (simulation) or an exported .onnx/.tflite file."""
    from ..evaluate import evaluate

    if db:
        check_results_db(db)
    result = evaluate(target, task=task, data=data, count=count, seq_len=seq_len, threads=threads)
    got = next((v for k, v in result["metrics"].items() if k in ("windows", "sentences", "images")), None)
    if count and got is not None and got < count:  # the evaluation half holds fewer: say so, not a silent cut
        click.echo(f"edgeq: note: --count {count}: the evaluation half of {result['data']} holds {got}; evaluated "
                   f"those", err=True)
    if db:
        from ..store import record_eval_result

        record_eval_result(db, result)
    if as_json:
        emit_json(result)
        return
    metrics = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result["metrics"].items())
    click.echo(f"{result['target']} [{result['label']}] {result['task']} on {result['data']}: {metrics}")
