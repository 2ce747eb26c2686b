"""TFLite export: fp32, dynamic-int8, int8 (full integer) and int4 (blockwise), carrying edgeq's grids exactly.

Pipeline: the quantized model is rendered as float layers with its dequantized weights and
converted once with litert-torch (`tflite_graph`, cached); ai-edge-quantizer then quantizes only
edgeq's layers with min/max overrides that reproduce edgeq's scales bit for bit (`tflite_quant`);
the file is read back and compared per layer (`tflite_check`), and run in LiteRT with XNNPACK
against the PyTorch simulation for parity; with `fuse`, sibling layers become one op first (`tflite_fuse`).
A grid TFLite cannot hold is refused up front with the nearest variant or recipe that works
(`tflite_grids`): nothing here re-quantizes anything on its own.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeqError, choice_error
from ..quantize.modules import activations_as
from ..recipe import ActSpec
from . import register_exporter, tflite_decode
from .meta import add_quality_context, held_back_inputs, parity_metrics, write_export_meta
from .runtime_min import TFLITE_RUNTIME_MIN
from .tflite_check import output_clipping, output_grids, output_rounding
from .tflite_grids import (CONVENTIONS, FULL_INTEGER, HYBRID, VARIANTS, check_representable, default_variant,
                           hybrid_activations, off_runtime_grid, on_runtime_grid, static_bits)
from .tflite_quant import OUTPUT_CALIBRATIONS
from .verdict import tolerance_verdict, within_noise_floor

DEFAULT_SEQ_LEN = 64
DEFAULT_CALIB_SAMPLES = 8  # inputs the full-integer variants' output grids are calibrated on

# Parity of the file (LiteRT, XNNPACK) against the PyTorch simulation is held to verdict.TOLERANCE per variant.
# fp32 differs only by float reassociation. The quantized variants differ by design where LiteRT's
# kernels quantize activations differently from the simulation: hybrid (dynamic) kernels quantize
# each row (a convolution's: each pixel or image) to asymmetric int8 where the simulation uses the recipe's grid
# (w8: symmetric per token; float activations for weight-only layers), and full-integer kernels requantize each
# layer's output to int8 (a grid calibrated at export; the simulation keeps outputs float), int16 in 16x8 files.
# A decode step over resized cache slots computes what the declared shape does (the extra slots masked to probability
# 0): its logits may differ by float reassociation only (measured 0.0 on tiny-llama in every variant, SmolLM2 fp32 and int4).
RESIZED_MAX_ABS = 1e-3

CLIPPED_LISTED = 20  # FILE.json `output_grids.clipped`: the layers whose outputs a grid saturated most, by fraction


def _parity_inputs(bundle, seq_len: int) -> list[tuple]:
    """Held-back inputs in the graph's fixed shape (encoder sentences padded with mask 0)."""
    inputs = held_back_inputs(bundle, seq_len=seq_len)
    if bundle.kind != "encoder":
        return inputs
    out = []
    for ids, mask in inputs:
        n = min(ids.shape[1], seq_len)
        pid, pmask = torch.zeros(1, seq_len, dtype=ids.dtype), torch.zeros(1, seq_len, dtype=mask.dtype)
        pid[:, :n], pmask[:, :n] = ids[:, :n], mask[:, :n]
        out.append((pid, pmask))
    return out


def _used_rows(bundle):
    """`(output, sample) -> rows`: the rows of a file's output its user reads. An encoder's sentences are padded to the
    file's fixed length, and the padding's rows (attention mask 0) are never read: pooled embeddings leave them out,
    so parity does too (in MiniLM's w8a8-static-fc2a16 file, the padding rows of the four parity sentences agreed with
    the simulation on top-1 from 0.47 to 1.0, the tokens' rows from 0.75 to 0.84). Every row otherwise."""
    if bundle.kind != "encoder":
        return lambda out, sample: out
    return lambda out, sample: np.asarray(out)[np.asarray(sample[1]).astype(bool)]


def _runtime_grid_parity(layers: dict, ref_module, run, inputs: list, got: list, file_nll: float | None) -> dict | None:
    """A hybrid file (dynamic-int8, int4) against the simulation with its layers' inputs quantized as LiteRT's hybrid
    kernels quantize them at run time (`on_runtime_grid`): whether the file departs from the simulation by more than
    the run-time grid and float noise explain (`_parity_under`). None: every linear and convolution layer is on that
    grid already (the `-litert` recipes' linear layers), or there is none."""
    if not off_runtime_grid(layers):
        return None
    return _parity_under(on_runtime_grid(layers), ref_module, run, inputs, got, file_nll,
                         "each layer's input quantized to asymmetric int8 as XNNPACK's hybrid kernels do (per row of a "
                         "linear layer's input, per pixel of a 1x1 convolution's, per image of another convolution's)")


def _parity_under(context, ref_module, run, inputs: list, got: list, file_nll: float | None, grid: str) -> dict:
    """The file against the simulation (`ref_module`, whose used rows `run(sample)` gives) run inside `context`, which
    adds a rounding the file does and the simulation does not (described by `grid`), with that simulation's own noise
    floor, for an LM (`file_nll`: the file's mean NLL, None for other models) its mean NLL, and whether the file is
    within that floor (`verdict.within_noise_floor`): if so, that rounding explains the file's departure."""
    from .meta import lm_nll, noise_floor

    with torch.no_grad(), context:
        ref = [run(x) for x in inputs]
        out = {k: v for k, v in parity_metrics(ref, got).items() if k in ("max_abs", "cos_min", "top1_agree")}
        nll = None if file_nll is None else {"simulation": lm_nll(ref, inputs), "file": file_nll}
        floor = noise_floor(ref_module, run, inputs, ref, file_nll is not None, file={**out, "nll": nll})
    out["grid"] = grid
    if floor is not None:
        out["noise_floor"] = {k: v for k, v in floor.items()
                              if k in ("cos_min", "top1_agree", "nll_spread", "draws", "per_draw")}
    if nll:
        out["nll_simulation"] = nll["simulation"]
    out["within_noise_floor"] = within_noise_floor({**out, "nll": nll, "noise_floor": floor})
    return out


def _resized_missed(parity: dict) -> list[str]:
    """A resized decode step against the declared one, as a missed check ("what: measured vs bound"), if it is one."""
    resized = (parity.get("decode") or {}).get("resized", {}).get("max_abs_vs_declared")
    if resized is None or resized <= RESIZED_MAX_ABS:
        return []
    return [f"decode.resized.max_abs_vs_declared {resized:.3g} > {RESIZED_MAX_ABS}"]


def _decode_input_meta(step, bundle, cache_len: int, dynamic: bool) -> list[dict]:
    """The decode signature's inputs for a profiler: a token id, the middle slot as its position (every step
    attends over all slots, masked, so the position does not change the work), and caches. Where the slot count
    is the runtime's choice, the mask's and caches' slot axis is the symbolic dim `slots` (default cache_len), so
    `edgeq profile --signature decode --dim slots=N` times the step holding N slots."""
    from .tflite_runtime import slot_axis

    specs = _input_meta(step, bundle)
    specs[1].update(role="input_pos", range=[cache_len // 2, cache_len // 2])
    specs[2]["role"] = "attention_mask"  # its values do not change the work either
    for s in specs[tflite_decode.CACHE_INPUT:]:
        s["role"] = "kv_cache"
    if dynamic:
        for j, s in enumerate(specs[2:], start=2):
            s["shape"][slot_axis(j)] = "slots"
            s["dim_defaults"] = {"slots": cache_len}
    return specs


def _calibration(bundle, seq_len: int, samples: int, model=None, cache_len: int = 0) -> dict[str, list[dict]]:
    """Calibration feeds per signature: the prefill's, and (decoder LMs with a decode signature) decode
    steps at spread positions with the caches a PyTorch forward gives."""
    from ..models.inputs import calibration_batches
    from .tflite_render import example_inputs

    batches = calibration_batches(bundle, None, samples, seq_len, batch_size=1)
    if bundle.kind == "encoder":
        padded = []
        for ids, mask in batches:
            n = min(ids.shape[1], seq_len)
            pid, pmask = torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, seq_len, dtype=torch.long)
            pid[:, :n], pmask[:, :n] = ids[:, :n], mask[:, :n]
            padded.append((pid, pmask))
        batches = padded
    ex = example_inputs(bundle, seq_len)
    out = {"serving_default": _feeds(batches, ex)}
    if cache_len:
        from .tflite_render import float_rendering

        with float_rendering(model):
            steps = tflite_decode.calibration_steps(model, [b[0] for b in batches[:2]], cache_len, max(1, samples // 2))
        out["decode"] = _feeds(steps, tflite_decode.example_inputs(model, cache_len))
    return out


def _feeds(batches: list[tuple], example: tuple) -> list[dict]:
    """Positional tensors as litert-torch's `args_<i>` feeds (integers as int32)."""
    dtypes = [np.int32 if not t.is_floating_point() else np.float32 for t in example]
    return [{f"args_{i}": np.asarray(t.numpy(), dtype=dt) for i, (t, dt) in enumerate(zip(b, dtypes))} for b in batches]


def _input_meta(runner, bundle) -> list[dict]:
    specs = runner.input_specs()
    if bundle.kind in ("causal-lm", "encoder") and specs:
        vocab = getattr(bundle.tokenizer, "vocab_size", None) or getattr(getattr(bundle.module, "config", None), "vocab_size", None)
        if vocab:
            specs[0]["range"] = [0, int(vocab) - 1]
        specs[0]["role"] = "input_ids"
        if bundle.kind == "encoder" and len(specs) > 1:
            specs[1]["role"] = "attention_mask"
            specs[1]["range"] = [0, 1]
    return specs


@register_exporter("tflite", ".tflite")
def export_tflite(qm=None, bundle=None, source: str = "", out: Path = None, variant: str | None = None,
                  seq_len: int = DEFAULT_SEQ_LEN, calib_samples: int | None = None, cache: bool = True,
                  cache_len: int | None = None, fuse: bool = False, output_calibration: str | None = None, **options) -> dict:
    """Write `out` (.tflite) and `out.json`; returns the metadata.

    Options: `seq_len` (token models: the graph's fixed sequence length, default 64),
    `calib_samples` (full integer only: inputs the output grids TFLite requantizes each layer's output to are
    calibrated on, default 8), `output_calibration` (full integer only: how each output range is taken from those
    inputs, "minmax" (default) or ai-edge-quantizer's "moving-average", `tflite_quant.calibrate`), `cache` (reuse a
    converted float graph of the same architecture), `cache_len` (decoder LMs: slots of the decode signature's KV
    cache, default 256 or seq_len if longer; 0: no decode signature), `fuse` (the layers reading one input made one
    op and SLICEs, `tflite_fuse`; not in full-integer files).
    Board gating (`target`) is done around every exporter by `edgeq.export.export`.
    """
    from ..fileio import atomic_path
    from .tflite_fuse import fuse_siblings, fused_meta
    from .tflite_graph import float_graph
    from .batchnorm import bn_folds, rendered_scale
    from .tflite_render import example_inputs
    from .tflite_runtime import TfliteRunner, runtime_version

    if options:
        raise EdgeqError(f"tflite: unknown option {sorted(options)[0]!r} "
                         "(allowed: seq_len, calib_samples, output_calibration, cache, cache_len, fuse)")
    out = Path(out)
    variant = variant or default_variant(qm)
    if variant not in VARIANTS:
        raise choice_error("variant", variant, VARIANTS)
    check_representable(qm, variant)
    for name, value in (("calib_samples", calib_samples), ("output_calibration", output_calibration)):
        if value is not None and variant not in FULL_INTEGER:
            raise EdgeqError(f"tflite: {name} applies to the full-integer variants ({', '.join(FULL_INTEGER)}), whose "
                             f"layers' outputs are requantized on calibrated grids; a {variant} file has none")
    if calib_samples is not None and (not isinstance(calib_samples, int) or isinstance(calib_samples, bool) or calib_samples < 1):
        raise EdgeqError(f"tflite: calib_samples must be a whole number >= 1, not {calib_samples!r}")
    if output_calibration is not None and output_calibration not in OUTPUT_CALIBRATIONS:
        raise choice_error("output_calibration", output_calibration, OUTPUT_CALIBRATIONS)
    calib_samples, output_calibration = calib_samples or DEFAULT_CALIB_SAMPLES, output_calibration or OUTPUT_CALIBRATIONS[0]
    if fuse and variant in FULL_INTEGER:
        raise EdgeqError(f"tflite: fuse applies to fp32, dynamic-int8 and int4 files, not {variant}: a full-integer layer "
                         "requantizes its output to its own grid, which the layers reading its input do not share")
    b = qm.bundle if qm is not None else bundle
    model = b.module.eval()
    layers = qm.layers() if qm is not None else {}
    cache_len, decode_note = tflite_decode.plan(b, model, cache_len, seq_len)

    folds = bn_folds(model, example_inputs(b, seq_len)) if layers else {}
    scales = {n: rendered_scale(m, folds.get(n)) for n, m in layers.items()}
    zeroed = {n: f.dead_channels() for n, f in folds.items() if f.dead is not None}  # batchnorm.BnFold.dead
    float_buf, ops, convert_s, static_slots = float_graph(b, model, seq_len, cache=cache, folds=folds, cache_len=cache_len)
    # layers the outputs do not depend on are not in the file (the converter drops them; float_graph checked why)
    unused = sorted(n for n in layers if n not in ops)
    layers = {n: m for n, m in layers.items() if n in ops}
    t0 = time.perf_counter()
    if variant == "fp32":
        buf = float_buf
    else:
        from .tflite_quant import quantize

        static = variant in FULL_INTEGER
        calib = _calibration(b, seq_len, calib_samples, model, cache_len) if static else None
        buf = quantize(float_buf, layers, ops, static, calib, scales, output_calibration)
    quantize_s = time.perf_counter() - t0
    fused, t0 = {}, time.perf_counter()
    if fuse:
        buf, fused = fuse_siblings(buf)
    fuse_s = time.perf_counter() - t0
    biases_16x8 = None
    if variant in FULL_INTEGER:
        from .tflite_quant import int32_biases_16x8

        buf, biases_16x8 = int32_biases_16x8(buf)

    check = None
    if layers and variant != "fp32":
        from .tflite_check import read_back

        check = read_back(buf, layers, scales, zeroed)

    runner = TfliteRunner(buf, threads=1)
    inputs = _parity_inputs(b, seq_len)
    float_acts = variant == "fp32" and qm is not None
    grids = output_grids(buf, layers) if variant in FULL_INTEGER else {}
    with (torch.no_grad(), (activations_as(layers, ActSpec()) if float_acts else contextlib.nullcontext()),
          output_clipping(layers, grids) as clipped):
        from .tflite_render import graph_module

        ref_module = graph_module(b, model)
        used = _used_rows(b)

        def run(x):  # the simulation's rows a user reads
            return used(ref_module(*x).float().numpy(), x)

        ref = [run(x) for x in inputs]
    got = [used(runner(*[t.numpy() for t in x])[0], x) for x in inputs]
    parity = parity_metrics(ref, got)
    if b.kind == "encoder":
        parity["rows_used"] = "each sentence's tokens (attention mask 1), not the padding to the file's fixed length"
    signatures = None
    if cache_len:
        step = TfliteRunner(buf, threads=1, signature="decode")
        parity["decode"], steps = tflite_decode.parity(step, runner, inputs[0][0].numpy(), ref[0], got[0], cache_len)
        if static_slots is None:
            parity["decode"]["resized"] = tflite_decode.resized_parity(buf, inputs[0][0].numpy(), steps, cache_len)
        signatures = {"serving_default": {"inputs": _input_meta(runner, b)},
                      "decode": {"inputs": _decode_input_meta(step, b, cache_len, static_slots is None)}}
        del step
    # the noise floor is drawn until the file is within it, so every check it is set against is measured first
    if not float_acts:
        with torch.no_grad():
            add_quality_context(parity, ref_module, run, inputs, ref, got, b.kind == "causal-lm")
        file_nll = (parity.get("nll") or {}).get("file")  # an LM's, from add_quality_context
        off_grid = None
        if variant in HYBRID:
            off_grid = _runtime_grid_parity(layers, ref_module, run, inputs, got, file_nll)
        if off_grid:
            parity["runtime_grid"] = off_grid
        if grids:
            parity["with_output_grids"] = _parity_under(
                output_rounding(layers, grids), ref_module, run, inputs, got, file_nll,
                "each layer's output rounded to its output grid in the file (int8; int16 in 16x8 layers) and saturated "
                "at its ends, as the file requantizes it")
    xnnpack = _xnnpack_coverage(buf, ["serving_default"] + (["decode"] if cache_len else []))
    reference = "PyTorch fp32" if qm is None else "PyTorch simulation" + (" with float activations" if float_acts else "")
    parity.update({"reference": reference, "runtime": f"{runtime_version()} XNNPACK, 1 thread",
                   **tolerance_verdict(parity, variant, _resized_missed(parity), b.kind)})

    if variant == "fp32":
        exact = None if qm is None else False  # fp32 of a quantized model carries dequantized weights, not integers
    else:
        # a folded BatchNorm leaves edgeq's integers intact but scales them: exact only without folds
        exact = bool(check["exact"]) and not folds
    with atomic_path(out) as tmp:
        tmp.write_bytes(buf)
    wide = sorted(n for n, bits in static_bits(layers).items() if bits == 16)
    extra = {
        "seq_len": seq_len if b.kind in ("causal-lm", "encoder") else None,
        "graph": {"prefill": {"signature": "serving_default", "seq_len": seq_len,
                              "outputs": "logits, then the decode signature's caches" if cache_len else "logits"}
                  if b.kind == "causal-lm" else None,
                  "decode": tflite_decode.signature_meta(model, cache_len, static_slots) if cache_len else None,
                  "decode_note": decode_note,
                  # per signature: the ops LiteRT's default XNNPACK delegate takes, in how many partitions, and the rest
                  "xnnpack": xnnpack,
                  # per signature: FULLY_CONNECTEDs reading one input made one op and SLICEs (`tflite_fuse`)
                  "fused": fused_meta(buf, fused)},
        # per signature, what `edgeq profile --signature NAME` feeds (the top-level `inputs` are serving_default's)
        "signatures": signatures,
        "runtime_min": {**TFLITE_RUNTIME_MIN["int16x8" if wide else variant], "tested": f"{runtime_version()} (XNNPACK)"},
        "conventions": CONVENTIONS,
        # hybrid kernels: whether the file's run-time activation grid is the recipe's
        "activations": hybrid_activations(layers) if variant in HYBRID else None,
        "readback": None if check is None else {"layers": len(check["layers"]), "mismatches": check["mismatches"][:20],
                                                "per_layer": check["layers"]},
        "timing_s": {"convert": round(convert_s, 2), "quantize": round(quantize_s, 2), "fuse": round(fuse_s, 2)},
        # a folded norm's dead channels hold zeros, not edgeq's integers (batchnorm.BnFold.dead)
        "exact_integers": None if check is None else bool(check["exact"]) and not zeroed,
        "bn_folded": {n: f.norm for n, f in folds.items()} or None,
        "layers_not_in_file": {"layers": unused, "reason": "the exported outputs do not depend on them, or their input is a constant "
                                                         "(DeBERTa-v2's relative-position projections): the converter drops "
                                                         "them, or computes them into a constant"}
        if unused else None,
        "tools": _tool_versions(),
    }
    if folds:
        extra["scale_note"] = ("TFLite has no separate BatchNorm: each BatchNorm after a quantized conv is folded on "
                               "edgeq's grid, so the file holds edgeq's integers with scales fp32(scale * gamma / "
                               "sqrt(var + eps)) (read back bitwise as such); exact is false because the scales are not edgeq's")
    if variant in FULL_INTEGER:
        extra["output_grids"] = {
            "note": (f"each integer layer's output is requantized to int{FULL_INTEGER[variant]}"
                     f"{' (int16 in its 16x8 layers)' if wide and variant == 'int8' else ''} on a grid ai-edge-quantizer "
                     f"calibrated on {calib_samples} calibration inputs ({output_calibration}), one grid per layer in "
                     "every signature (not part of the edgeq simulation)"),
            "calib_samples": calib_samples, "calibration": output_calibration, "layers": len(grids),
            # the simulation's outputs on the parity inputs that a layer's grid saturates: where the file departs from it
            "clipped_layers": len(clipped),
            "clipped": {n: {**e, "grid": [float(f"{v:.6g}") for v in e["grid"]], "seen": [float(f"{v:.6g}") for v in e["seen"]]}
                        for n, e in list(clipped.items())[:CLIPPED_LISTED]},
        }
    if wide and variant == "int8":
        extra["int16x8_layers"] = {"layers": wide, "note": "the recipe's 16-bit layers: int16 activations in and out, int8 weights, "
                                                           "on LiteRT's built-in kernels (XNNPACK runs the int8 layers)"}
    if biases_16x8 is not None:
        extra["biases_16x8"] = biases_16x8  # `tflite_quant.int32_biases_16x8`: which 16x8 kernel LiteRT runs
    try:
        return write_export_meta(out, fmt="tflite", variant=variant, model=b.reference,
                                 qdir=source if qm is not None else None, recipe=qm.recipe.name if qm is not None else None,
                                 exact=exact, parity=parity, inputs=_input_meta(runner, b), extra=extra)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _xnnpack_coverage(buf: bytes, signatures: list[str]) -> dict:
    from .tflite_runtime import runtime_version, xnnpack_coverage

    out = {name: xnnpack_coverage(buf, name) for name in signatures}
    if None in out.values():  # a runtime whose interpreter does not list its nodes
        return {"note": f"not measured: {runtime_version()}'s interpreter does not list its nodes"}
    return out


def _tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
