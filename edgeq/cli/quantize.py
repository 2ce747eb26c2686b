"""`edgeq quantize MODEL --recipe R [--calib DATA] -o QDIR`."""

from __future__ import annotations

import time

import click

from ..console import size_text
from ..errors import EdgeqError
from .common import check_new_dir, emit_json, json_option, progress


@click.command()
@click.argument("model")
@click.option("--recipe", "-r", required=True, help="Preset name (see `edgeq recipes`), a .toml/.yaml recipe file, or `auto`.")
@click.option("--calib", "calib", default=None, help="Calibration data: enwiki, pydoc, images, a text file, an image folder or a .npy array.")
@click.option("--samples", type=click.IntRange(1, 4096), default=None, help="Calibration samples (default: the recipe's).")
@click.option("--seq-len", type=click.IntRange(8, 32768), default=None, help="Calibration window length in tokens (default: the recipe's).")
@click.option("--target", default=None, help="With --recipe auto: the board profile whose bit-widths are allowed.")
@click.option("--budget", default=None, help="With --recipe auto: size budget, e.g. 60MB, 4.5bits or 25%.")
@click.option("--bits", default=None, help="With --recipe auto: allowed weight bit-widths, e.g. 2,3,4,8 (narrows the target's set).")
@click.option("--runtime", default=None,
              help="With --recipe auto: which of the target's runtimes the plan is for (default: its first, e.g. "
                   "onnxruntime-cpu; litert-xnnpack for a TFLite file).")
@click.option("--activation", type=click.Choice(["none", "dynamic", "static"]), default=None,
              help="With --recipe auto: float activations, int8 per token at run time, or static int8 per tensor from "
                   "calibration (a full-integer file; 8-bit weights). Default: the runtime's (dynamic on TFLite, whose "
                   "INT4/INT8 kernels quantize them; none otherwise).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=None,
              help="With --recipe auto: how the chosen bits are applied (default rtn; gptq: slower, better at 4 bits).")
@click.option("--allow-fallback", is_flag=True,
              help="With --recipe auto: also bit-widths the runtime runs only through a fallback.")
@click.option("--embedding-bits", type=click.IntRange(2, 8), default=None,
              help="With --recipe auto: also quantize the input embedding per row (a tied head shares it). Default: float.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Quantized-model directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory (only once the new one is complete).")
@json_option
def quantize(model, recipe, calib, samples, seq_len, target, budget, bits, runtime, activation, method, allow_fallback,
             embedding_bits, output, overwrite, as_json):
    """Quantize MODEL (a built-in name, a Hugging Face directory or package.module:factory)."""
    from ..models import load_model
    from ..models.inputs import calibration_batches
    from ..quantize.ptq import quantize_model
    from ..recipe import load_recipe

    check_new_dir(output, overwrite)
    start = time.perf_counter()
    if recipe == "auto":
        from ..quantize.mixed import MixedOptions, quantize_auto

        options = MixedOptions(embedding_bits=embedding_bits, runtime=runtime, activation=activation,
                               allow_fallback=allow_fallback, method=method or "rtn")
        qm = quantize_auto(model, target=target, budget=budget, calib=calib, samples=samples, seq_len=seq_len, bits=bits,
                          options=options, progress=progress)
    else:
        if embedding_bits is not None:
            raise EdgeqError("--embedding-bits is for --recipe auto; a recipe file sets its own [embedding] table")
        given = [flag for flag, value in (("--target", target), ("--budget", budget), ("--bits", bits),
                                          ("--runtime", runtime), ("--activation", activation), ("--method", method),
                                          ("--allow-fallback", allow_fallback or None)) if value is not None]
        if given:
            raise EdgeqError(f"{given[0]} applies to --recipe auto; recipe {recipe!r} sets every layer's bits itself "
                             "(check a file against a board with `edgeq check QDIR --target NAME`)")
        rec = load_recipe(recipe)
        bundle = load_model(model)
        batches = None
        if rec.needs_calibration or calib:
            rec = rec.calibrated(samples, seq_len)  # recipe.toml records what ran, so that it re-runs the same
            batches = calibration_batches(bundle, calib, rec.calibration.samples, rec.calibration.seq_len)
        qm = quantize_model(bundle, rec, batches, progress=progress)
    qm.save(output, overwrite=overwrite)
    summary = qm.summary()
    result = {
        "output": str(output), "model": summary["model"], "recipe": summary["recipe"],
        "layers": len(summary["layers"]), "avg_bits": summary["avg_bits"],
        "bytes_before": summary["bytes_before"], "bytes_after": summary["bytes_after"],
        "size_reduction": summary["size_reduction"], "seconds": round(time.perf_counter() - start, 2),
        "batchnorms_folded": len(summary.get("folded_batchnorms") or {}),
    }
    fitted = {e["name"]: e["bias_fit_channels"] for e in summary["layers"] if e.get("bias_fit_channels")}
    if fitted:
        channels = sum(map(len, fitted.values()))
        click.echo(f"edgeq: note: {channels} output channel{'s' * (channels != 1)} in {len(fitted)} "
                   f"layer{'s' * (len(fitted) != 1)} had weights near zero and a bias their int32 grid (input scale x "
                   "weight scale) could not hold, as a BatchNorm with a gain near 0 leaves once folded: their scales were "
                   "raised until it fits, their weights are now zero (quant.json bias_fit_channels)", err=True)
    for idle in qm.extra.get("rules_matching_no_layer", []):
        click.echo(f"edgeq: note: recipe {summary['recipe']!r} rule {idle['rule']} (match \"{idle['match']}\") decides no layer "
                   f"of {summary['model']!r}: the layers it was written for are named otherwise here, or an earlier rule "
                   "takes them", err=True)
    mixed = qm.extra.get("mixed") or {}
    convs = mixed.get("convolutions_left_float") or {}
    if convs.get("count"):
        n = convs["count"]
        click.echo(f"edgeq: note: --recipe auto: {n} convolution{'s' * (n != 1)} ({size_text(convs['bytes'])}) "
                   f"stay{'s' * (n == 1)} float whatever the budget: {convs['why']}", err=True)
    kept = mixed.get("convolutions_kept_float") or []
    if kept:
        click.echo(f"edgeq: note: the plan keeps {len(kept)} convolution{'s' * (len(kept) != 1)} float, where 8 bits "
                   f"would cost the most loss per byte saved ({kept[0]}{', ...' if len(kept) > 1 else ''}; quant.json "
                   "mixed.convolutions_kept_float)", err=True)
    if "measured_alternative" in mixed:
        other, kept = mixed["measured_alternative"], mixed["allocation"]["strategy"]
        loss = mixed["objective"].split(" (")[0]  # next-token cross-entropy, or mean squared error to the float output
        click.echo(f"edgeq: note: kept the {kept} plan ({loss} {mixed['measured_loss']:.4g} on the calibration data) "
                   f"over the {other['strategy']} one ({other['measured_loss']:.4g}), both within the budget", err=True)
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"{result['output']}: {result['layers']} layers quantized with {result['recipe']}, avg {result['avg_bits']} bits/weight, "
            f"{size_text(result['bytes_before'], 1)} -> {size_text(result['bytes_after'], 1)} "
            f"({100 * result['size_reduction']:.1f}% smaller) in {result['seconds']} s"
            + (f"; {result['batchnorms_folded']} BatchNorms folded into their layers first" if result["batchnorms_folded"] else "")
        )
