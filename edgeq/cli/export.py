"""`edgeq export QDIR|MODEL --format onnx|tflite [--variant V] -o FILE`."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import size_text
from .common import check_new_output, emit_json, json_option


@click.command()
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite"]), default=None,
              help="Output format (default: the output's suffix, .onnx or .tflite).")
@click.option("--variant", default=None, help="Rendering (default follows the recipe): onnx fp32|int8|int16x8|dynamic-int8|weight-only; tflite fp32|dynamic-int8|int8|int16x8|int4.")
@click.option("--output", "-o", required=True, type=click.Path(), help="File to write (FILE.json is written beside it).")
@click.option("--target", default=None, help="Board profile to check the export against (see `edgeq targets list`).")
@click.option("--allow-fallback", is_flag=True, help="With --target: export even where the board falls back to slower kernels (recorded in FILE.json).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="TFLite: the fixed token count of a token model's graph (default 64).")
@click.option("--cache-len", type=click.IntRange(min=0), default=None,
              help="TFLite decoder LMs: KV-cache slots of the decode signature (default 256; 0: no decode signature).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None,
              help="TFLite full-integer (int8, int16x8), and ONNX with --output-grids: calibration inputs for the grids layers' "
                   "outputs are requantized to (default 8; TFLite: FILE.json output_grids.clipped lists the outputs they "
                   "saturate on the parity inputs).")
@click.option("--output-grids", is_flag=True,
              help="ONNX int8 files of image models: also quantize each Conv / Gemm / residual Add output that a float op (a "
                   "residual Add, a pooling) reads, on a calibrated uint8 grid or the next layer's, and pool with "
                   "GlobalAveragePool, so ONNX Runtime runs every such op on integer kernels "
                   "(not part of the simulation: FILE.json parity measures the departure).")
@click.option("--output-calibration", type=click.Choice(["minmax", "moving-average"]), default=None,
              help="TFLite full-integer: each output grid spans the lowest to highest output over the calibration inputs "
                   "(minmax, the default) or ai-edge-quantizer's moving average of their ranges (0.95 old + 0.05 new).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="ONNX weight-only layers: ONNX Runtime's MatMulNBits accuracy level, recorded in FILE.json and used for "
                   "parity (0, the default: float activations, exact; 4: int8 activations quantized per row-block at run time, fastest).")
@click.option("--int8-weights", type=click.Choice(["uint8", "int8"]), default=None,
              help="ONNX 8-bit weights of layers with INT8 activations: uint8 (default; +128, exact in ONNX Runtime on every CPU) "
                   "or int8 (ONNX Runtime's own convention: its u8s8 kernels, faster on x86 with VNNI/AMX, saturating on AVX2-only x86).")
@click.option("--no-optimize", is_flag=True,
              help="ONNX: write the graphs as rendered, without ONNX Runtime's basic graph optimizations (saved by default: "
                   "plain ONNX operators, faster sessions) and with float biases where the optimized file has int32 ones "
                   "(TensorRT's parser refuses those).")
@click.option("--fuse", is_flag=True,
              help="TFLite: make the layers that read one input (query/key/value, gate/up) one FULLY_CONNECTED and SLICEs "
                   "(bitwise the same outputs; not in full-integer files). On x86 measured at 0.94-1.02x the decode step time; time it on your board.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@json_option
def export(source, fmt, variant, output, target, allow_fallback, seq_len, cache_len, calib_samples, output_grids,
           output_calibration, accuracy_level, int8_weights, no_optimize, fuse, overwrite, as_json):
    """Export SOURCE (a quantized-model directory, or a model reference for FP32)."""
    from ..errors import EdgeqError
    from ..export import companions, export as run_export
    from ..export.verdict import explained_by

    if fmt is None:
        fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(Path(output).suffix)
        if fmt is None:
            raise EdgeqError(f"export: pass --format onnx or tflite (the output {output!r} ends in neither .onnx nor .tflite)")
    for path in (output, *companions(output, fmt)):  # an export replaces its companions too: none taken unasked
        check_new_output(path, overwrite)
    options = {}
    if target:
        options.update(target=target, allow_fallback=allow_fallback)
    for name, value in (("seq_len", seq_len), ("cache_len", cache_len)):
        if value is not None:
            if fmt != "tflite":
                raise EdgeqError(f"export: --{name.replace('_', '-')} applies to --format tflite (ONNX graphs take any length)")
            options[name] = value
    if output_grids:
        if fmt != "onnx":
            raise EdgeqError("export: --output-grids applies to --format onnx (a TFLite int8 file requantizes every layer's "
                             "output already)")
        options["output_grids"] = True
    for name, value in (("calib_samples", calib_samples), ("output_calibration", output_calibration)):
        if value is not None:
            if fmt != "tflite" and not (name == "calib_samples" and output_grids):
                raise EdgeqError(f"export: --{name.replace('_', '-')} applies to --format tflite, or to onnx with "
                                 "--output-grids for --calib-samples (an ONNX layer's output stays float otherwise: no "
                                 "output grid to calibrate)")
            options[name] = value
    for name, value in (("accuracy_level", accuracy_level), ("int8_weights", int8_weights)):
        if value is not None:
            if fmt != "onnx":
                raise EdgeqError(f"export: --{name.replace('_', '-')} applies to --format onnx (ONNX Runtime's integer kernels)")
            options[name] = value
    if fuse:
        if fmt != "tflite":
            raise EdgeqError("export: --fuse applies to --format tflite (ONNX Runtime fuses by its own graph optimizations)")
        options["fuse"] = True
    if no_optimize:
        if fmt != "onnx":
            raise EdgeqError("export: --no-optimize applies to --format onnx (ONNX Runtime's graph optimizations)")
        options["optimize"] = False
    meta = run_export(source, fmt, output, variant=variant, **options)
    parity = meta.get("parity") or {}
    explained = explained_by(parity)
    if parity.get("within_tolerance") is False and parity.get("within_noise_floor"):
        floor = parity["noise_floor"]
        nll = f", mean NLL within {floor['nll_spread']:.4f}" if "nll_spread" in floor else ""
        click.echo(f"edgeq: note: {output} misses the parity tolerance ({', '.join(parity['missed'])}), but is no further "
                   f"from the {parity.get('reference')} than the simulation is from itself under float noise (worst of "
                   f"{floor['draws']} draws: cos_min {floor['cos_min']:.4f}, top1_agree {floor['top1_agree']:.4f}{nll}): "
                   f"the tolerance is tighter than this model's rounding ties allow (its parity in {output}.json)", err=True)
    elif parity.get("within_tolerance") is False and explained:
        click.echo(f"edgeq: note: {output} misses the parity tolerance ({', '.join(parity['missed'])}), but is no further "
                   f"from the {parity.get('reference')} with {explained} than that simulation is from itself under float "
                   f"noise: the file computes what edgeq simulates, and the difference is {explained}, which quant.json's "
                   f"simulation leaves out (its parity in {output}.json)", err=True)
        _parity_context(parity)
        _grid_notes(meta)
    elif parity.get("within_tolerance") is False:
        click.echo(f"edgeq: warning: {output} differs from the {parity.get('reference')} beyond the tolerance: "
                   f"{', '.join(parity.get('missed') or ['see its parity'])} (its parity in {output}.json); "
                   "check it before shipping it", err=True)
        _parity_context(parity)
        _grid_notes(meta)
    if as_json:
        emit_json(meta)
        return
    top1 = parity.get("top1_agree")
    click.echo(
        f"{output}: {meta['format']} {meta['variant']}, {size_text(meta['size_bytes'])}, exact={meta['exact']}, "
        f"parity max_abs={parity.get('max_abs', float('nan')):.3g} cos_min={parity.get('cos_min', float('nan')):.6f} "
        f"top1_agree={'n/a' if top1 is None else f'{top1:.4f}'}"
    )


def _grid_notes(meta: dict) -> None:
    """After a missed parity, on stderr: the full-integer file's output grids that saturate most, and what widens them;
    for an ONNX file with output grids, that its parity measures them (edgeq's simulation does not have them)."""
    grids = meta.get("output_grids") or {}
    if meta.get("format") == "onnx" and grids:
        click.echo(f"edgeq: note: the file's output grids (--output-grids: {grids['tensors']} tensors, calibrated on "
                   f"{grids['calib_samples']} inputs) are not part of edgeq's simulation, so its parity measures their "
                   "rounding too; export without them to check the rest", err=True)
        return
    if not grids.get("clipped"):
        return
    name, worst = next(iter(grids["clipped"].items()))
    click.echo(f"edgeq: note: the output grids calibrated at export saturate {grids['clipped_layers']} of "
               f"{grids['layers']} layers' outputs on the parity inputs (most: {name}, {worst['values']} of "
               f"{worst['of']} values, seen [{worst['seen'][0]:.4g}, {worst['seen'][1]:.4g}] against "
               f"[{worst['grid'][0]:.4g}, {worst['grid'][1]:.4g}]); calibrate on more inputs (--calib-samples, "
               f"now {grids['calib_samples']}"
               f"{'' if grids.get('calibration') != 'moving-average' else ', with --output-calibration minmax'}) "
               f"or give those layers 16-bit activations{_sixteen_bit_hint(meta.get('recipe'))}", err=True)


def _sixteen_bit_hint(recipe: str | None) -> str:
    """Which preset gives the layers that need it 16-bit activations, after an int8 file's saturating output grids."""
    if recipe == "w8a8-static":
        return (" (recipe w8a8-static-fc2a16 gives them to the MLP down-projections, whose outputs carry the residual "
                "stream's outliers; MiniLM's embedding cosine with FP32 went from 0.947 to 0.995)")
    if recipe != "w8a16-static":
        return " (recipe w8a16-static with --variant int16x8 gives them to every layer, on LiteRT's slower built-in kernels)"
    return ""


def _parity_context(parity: dict) -> None:
    """What a missed parity means, on stderr: an LM's NLL beside the simulation's, the simulation's own noise floor,
    for a hybrid file the same against the run-time activation grid its kernels use, for a full-integer one against
    its output grids, and an ONNX file's unpinned accuracy level."""
    from ..export.meta import NOISE_REL
    from ..export.verdict import BESIDE

    nll, floor = parity.get("nll"), parity.get("noise_floor")
    parts = []
    if nll:
        parts.append(f"mean NLL {nll['file']:.4f} against the simulation's {nll['simulation']:.4f} on {nll['tokens']} tokens")
    if floor:
        parts.append(f"the simulation against itself, its layers' inputs perturbed by {NOISE_REL:g}: cos_min "
                     f"{floor['cos_min']:.4f}, top1_agree {floor['top1_agree']:.4f}")
    if parts:
        click.echo(f"edgeq: note: {'; '.join(parts)}", err=True)
    if parity.get("accuracy_level_note"):
        click.echo(f"edgeq: note: {parity['accuracy_level_note']}", err=True)
    for key, what in BESIDE:
        beside = parity.get(key)
        if not beside:
            continue
        text = (f"edgeq: note: against the simulation with {what} ({beside['grid']}): "
                f"cos_min {beside['cos_min']:.4f}, top1_agree {beside['top1_agree']:.4f}")
        if beside.get("nll_simulation") is not None:
            text += f", that simulation's mean NLL {beside['nll_simulation']:.4f}"
        if beside.get("noise_floor"):
            text += (f"; it against itself perturbed: cos_min {beside['noise_floor']['cos_min']:.4f}, "
                     f"top1_agree {beside['noise_floor']['top1_agree']:.4f}")
        click.echo(text, err=True)
