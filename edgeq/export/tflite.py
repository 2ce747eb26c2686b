"""TFLite export: fp32, dynamic-int8, int8 (full integer) and int4 (blockwise), carrying edgeq's grids exactly.

Pipeline: the quantized model is rendered as float layers with its dequantized weights and
converted once with litert-torch (`tflite_graph`, cached); ai-edge-quantizer then quantizes only
edgeq's layers with min/max overrides that reproduce edgeq's scales bit for bit (`tflite_quant`);
the file is read back and compared per layer (`tflite_check`), and run in LiteRT with XNNPACK
against the PyTorch simulation for parity. A grid TFLite cannot hold is refused up front with the
nearest variant or recipe that works: this module never re-quantizes anything on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EdgeqError, choice_error
from . import register_exporter, tflite_decode
from .meta import add_quality_context, held_back_inputs, parity_metrics, write_export_meta

VARIANTS = ("fp32", "dynamic-int8", "int8", "int16x8", "int4")
FULL_INTEGER = {"int8": 8, "int16x8": 16}  # variant -> the static activation bits it holds
DEFAULT_SEQ_LEN = 64

# Parity of the file (LiteRT, XNNPACK) against the PyTorch simulation, per variant: (cos_min, top1_agree).
# fp32 differs only by float reassociation. The quantized variants differ by design where LiteRT's
# kernels quantize activations differently from the simulation: hybrid (dynamic) kernels quantize
# each row to asymmetric int8 where the simulation uses the recipe's grid (w8: symmetric per token;
# float activations for weight-only layers), and full-integer kernels requantize each layer's output to
# int8 (a grid calibrated at export; the simulation keeps outputs float), int16 in 16x8 files.
TOLERANCE = {"fp32": (0.9999, 0.99), "dynamic-int8": (0.99, 0.9), "int4": (0.99, 0.9), "int8": (0.97, 0.85),
             "int16x8": (0.99, 0.9)}

# What each variant needs at run time. Measured here: every variant runs correctly in ai-edge-litert
# 2.3 with XNNPACK. In tflite-runtime 2.14 (its last release; run with numpy 1.26) fp32 and full-integer
# int8 files give the same outputs, while dynamic-int8 and int4 files (hybrid kernels) load and run but
# give wrong outputs (cosine < 0.9 vs ai-edge-litert on tiny-llama and a small CNN): they need ai-edge-litert.
# Older ai-edge-litert releases were not tested.
# A decode step over resized cache slots computes what the declared shape does (the extra slots masked to probability
# 0): its logits may differ by float reassociation only (measured 0.0 on tiny-llama in every variant, SmolLM2 fp32 and int4).
RESIZED_MAX_ABS = 1e-3

RUNTIME_MIN = {
    "fp32": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": "2.14 (tested: same outputs)"},
    "int8": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": "2.14 (tested: same outputs up to integer rounding)"},
    "int16x8": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": None,
                "note": "16x8 (int16 activations, int8 weights) runs on LiteRT's built-in kernels, not XNNPACK; "
                        "tflite-runtime was not tested with it"},
    "dynamic-int8": {"ai-edge-litert": "2.3 (tested)",
                     "tflite-runtime": None, "note": "tflite-runtime 2.14 runs the file with wrong results (hybrid kernels)"},
    "int4": {"ai-edge-litert": "2.3 (tested)", "tflite-runtime": None,
             "note": "INT4 blockwise (BlockwiseQuantization, fp16 block scales): tflite-runtime 2.14 runs it with wrong results"},
}
CONVENTIONS = {
    "int8_weights": "symmetric narrow range [-127, 127], zero point 0, float32 scale per output channel",
    "int4_weights": "symmetric [-8, 7], scale = absmax / 7, zero point 0; blockwise scales stored as fp16 holding bf16 values",
    "int8_activations": "static: int8 per-tensor, zero point = edgeq's uint8 zero point - 128 (same real grid)",
    "int16_activations": "static (16x8): int16 per-tensor, symmetric, zero point 0, saturating at [-32768, 32767]",
    "dynamic_activations": "LiteRT hybrid kernels: per-row asymmetric int8 computed at run time",
}


def static_bits(layers: dict) -> dict[str, int]:
    """Each layer with static activations -> their bits (8: int8, 16: LiteRT's 16x8)."""
    return {n: m.decision.activation.bits for n, m in layers.items() if m.decision.activation.mode == "static"}


def default_variant(qm) -> str:
    """The variant a quantized model's recipe asks for (fp32 without one)."""
    if qm is None:
        return "fp32"
    bits = set(static_bits(qm.layers()).values())
    if bits:
        return "int16x8" if bits == {16} else "int8"  # int8 holds a recipe's 16x8 layers too
    if any(m.decision.weight.bits <= 4 for m in qm.layers().values()):
        return "int4"
    return "dynamic-int8"


def check_representable(qm, variant: str) -> None:
    """Refuse grids the variant cannot hold, naming what would work. Never re-quantizes."""
    if variant == "fp32":
        return
    if qm is None:
        raise EdgeqError(f"tflite: variant {variant!r} needs a quantized-model directory (edgeq quantize first); "
                         "a model reference exports as --variant fp32")
    # an int8 file may hold 16x8 layers where the recipe mixes them in (w8a8-static-fc2a16); 16 bits throughout is int16x8
    has_int8 = 8 in static_bits(qm.layers()).values()
    for name, m in qm.layers().items():
        d, w, a = m.decision, m.decision.weight, m.decision.activation
        where = f"tflite: layer {name} ({w.name}, act={a.mode}{a.bits if a.quantized else ''})"
        if d.kind == "embedding":
            if variant in FULL_INTEGER:
                raise EdgeqError(f"{where}: a full-integer (--variant {variant}) graph keeps its embedding table float here; "
                                 "leave the recipe's [embedding] table out, or export --variant dynamic-int8 / int4")
        if not w.symmetric:
            raise EdgeqError(f"{where}: LiteRT integer kernels need symmetric weights (zero point 0); "
                             f"re-quantize with symmetric = true (e.g. recipe {'w4-g128-litert' if w.bits <= 4 else 'w8'})")
        if w.bits not in (4, 8):
            raise EdgeqError(f"{where}: LiteRT has no {w.bits}-bit weight kernels; nearest: recipe w4-g128-litert (--variant int4)")
        if w.bits == 8 and d.kind != "embedding" and int(m.qweight.min()) < -127:
            raise EdgeqError(f"{where}: holds the integer -128, outside LiteRT's int8 weight range [-127, 127]; re-quantize "
                             "(edgeq's quantizers keep 8-bit narrow grids inside it; this QDIR predates that for GPTQ)")
        if w.range == "full":
            raise EdgeqError(f"{where}: full-range INT4/INT8 grids (signed scales, all 2^b levels) are ONNX Runtime's convention; "
                             f"LiteRT scales absmax to 2^(b-1)-1: re-quantize with range = 'narrow' "
                             f"(recipe w4-g{64 if (w.group_size or 128) <= 64 else 128}-litert)")
        if a.quantized and a.bits != 8 and not (a.mode == "static" and a.bits == 16):
            raise EdgeqError(f"{where}: LiteRT has no {a.bits}-bit activations; nearest: recipe w8a8-static (--variant int8), "
                             "w8a16-static (--variant int16x8) or w8 (--variant dynamic-int8)")
        if variant in FULL_INTEGER:
            allowed = ((8, 16) if has_int8 else (8,)) if variant == "int8" else (16,)
            preset = "w8a8-static" if variant == "int8" else "w8a16-static"
            if w.bits != 8 or a.mode != "static" or a.bits not in allowed:
                raise EdgeqError(f"{where}: --variant {variant} (full integer) needs 8-bit weights with static "
                                 f"{' or '.join(f'{x}-bit' for x in allowed)} activations in every layer; use recipe {preset}, "
                                 f"or --variant {default_variant(qm)} for this model")
            if a.symmetric != (a.bits == 16):
                raise EdgeqError(f"{where}: LiteRT's {a.bits}-bit static activations are "
                                 f"{'symmetric int16' if a.bits == 16 else 'asymmetric int8'}; re-quantize with "
                                 f"activation.symmetric = {str(a.bits == 16).lower()} (recipe {preset})")
        else:
            if a.mode == "static":
                raise EdgeqError(f"{where}: static activations need --variant {'int16x8' if a.bits == 16 else 'int8'} "
                                 "(a dynamic variant would drop the grid)")
            if variant == "dynamic-int8" and w.bits != 8:
                raise EdgeqError(f"{where}: --variant dynamic-int8 needs 8-bit weights; use --variant int4")
        if w.granularity == "group":
            if w.bits != 4 or d.kind not in ("linear", "embedding"):
                raise EdgeqError(f"{where}: LiteRT's blockwise weights are INT4 on fully-connected layers and embedding "
                                 "tables only; use granularity = 'channel'")
            from .tflite_quant import BLOCK_SIZES

            if w.group_size not in BLOCK_SIZES:
                near = min(BLOCK_SIZES, key=lambda b: abs(b - w.group_size))
                raise EdgeqError(f"{where}: LiteRT has blockwise INT4 for block sizes {', '.join(map(str, BLOCK_SIZES))}, "
                                 f"not {w.group_size}; re-quantize with group_size = {near} (e.g. recipe w4-g{near if near in (64, 128) else 128}-litert)")
            if d.shape[1] % w.group_size:
                fits = [b for b in BLOCK_SIZES if d.shape[1] % b == 0]
                hint = f"re-quantize with group_size = {max(fits)} (e.g. recipe w4-g{max(fits)}-litert)" if fits else "use granularity = 'channel'"
                raise EdgeqError(f"{where}: input width {d.shape[1]} is not a multiple of the block size {w.group_size} "
                                 f"(LiteRT has no short last block); {hint}")
            s = m.scale.detach().float().numpy()
            if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
                raise EdgeqError(f"{where}: its block scales are not exact in LiteRT's fp16/bf16 block-scale storage; "
                                 "re-quantize with scale_dtype = 'bf16' (recipe w4-g128-litert)")
        if d.kind == "conv2d" and w.bits != 8:
            raise EdgeqError(f"{where}: INT4 convolutions are not rendered; quantize convolutions to 8 bits (--variant dynamic-int8/int8)")


def representability(qm) -> dict:
    """What quant.json says of a quantized model's grids in TFLite: per quantized variant, whether `edgeq export
    --format tflite --variant V` holds edgeq's integers and scales as they are (the export's read-back then proves
    it bitwise), or the one-line reason it refuses, naming what works; the conventions LiteRT's kernels read them
    with; and where a BatchNorm after a quantized conv will be folded into its scales (integers kept, scales not)."""
    variants = {}
    for variant in VARIANTS[1:]:
        try:
            check_representable(qm, variant)
            variants[variant] = {"representable": True}
        except EdgeqError as exc:
            variants[variant] = {"representable": False, "why": str(exc).removeprefix("tflite: ")}
    convs = [m for m in qm.layers().values() if m.decision.kind == "conv2d"]
    batchnorm = convs and any(isinstance(m, torch.nn.BatchNorm2d) for m in qm.model.modules())
    return {"default_variant": default_variant(qm), "variants": variants, "conventions": CONVENTIONS,
            "note": ("a BatchNorm after a quantized conv is folded at export on edgeq's grid: the file holds edgeq's integers "
                     "with scales times the BatchNorm factor (FILE.json exact: false)") if batchnorm else None}


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


@contextlib.contextmanager
def _float_activations(layers: dict):
    """The simulation with its activation quantization off: the reference for an fp32 rendering of a QDIR."""
    from ..recipe import ActSpec

    saved = {n: m.decision for n, m in layers.items()}
    try:
        for m in layers.values():
            m.decision = dataclasses.replace(m.decision, activation=ActSpec())
        yield
    finally:
        for n, m in layers.items():
            m.decision = saved[n]


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
                  seq_len: int = DEFAULT_SEQ_LEN, calib_samples: int = 8, cache: bool = True,
                  cache_len: int | None = None, fuse: bool = False, **options) -> dict:
    """Write `out` (.tflite) and `out.json`; returns the metadata.

    Options: `seq_len` (token models: the graph's fixed sequence length, default 64),
    `calib_samples` (full integer only: batches used to calibrate the output grids TFLite requantizes
    each layer's output to), `cache` (reuse a converted float graph of the same architecture),
    `cache_len` (decoder LMs: slots of the decode signature's KV cache, default 256 or seq_len if longer;
    0: no decode signature), `fuse` (the layers reading one input made one op and SLICEs, `tflite_fuse`; not in
    full-integer files).
    Board gating (`target`) is done around every exporter by `edgeq.export.export`.
    """
    from ..fileio import atomic_path
    from .tflite_graph import float_graph
    from .tflite_render import bn_folds, example_inputs, rendered_scale
    from .tflite_runtime import TfliteRunner, runtime_version

    if options:
        raise EdgeqError(f"tflite: unknown option {sorted(options)[0]!r} "
                         "(allowed: seq_len, calib_samples, cache, cache_len, fuse)")
    out = Path(out)
    variant = variant or default_variant(qm)
    if variant not in VARIANTS:
        raise choice_error("variant", variant, VARIANTS)
    check_representable(qm, variant)
    if fuse and variant in FULL_INTEGER:
        raise EdgeqError(f"tflite: fuse applies to fp32, dynamic-int8 and int4 files, not {variant}: a full-integer layer "
                         "requantizes its output to its own grid, which the layers reading its input do not share")
    if fuse and variant in FULL_INTEGER:
        raise EdgeqError(f"tflite: fuse applies to fp32, dynamic-int8 and int4 files, not {variant}: a full-integer layer "
                         "requantizes its output to its own grid, which the layers reading its input do not share")
    b = qm.bundle if qm is not None else bundle
    model = b.module.eval()
    layers = qm.layers() if qm is not None else {}
    cache_len, decode_note = tflite_decode.plan(b, model, cache_len, seq_len)

    folds = bn_folds(model, example_inputs(b, seq_len)) if layers else {}
    scales = {n: rendered_scale(m, folds.get(n)) for n, m in layers.items()}
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
        buf = quantize(float_buf, layers, ops, static, calib, scales)
    quantize_s = time.perf_counter() - t0
    fused, t0 = {}, time.perf_counter()
    if fuse:
        from .tflite_fuse import fuse_siblings

        buf, fused = fuse_siblings(buf)
    fuse_s = time.perf_counter() - t0

    check = None
    if layers and variant != "fp32":
        from .tflite_check import read_back

        check = read_back(buf, layers, scales)

    runner = TfliteRunner(buf, threads=1)
    inputs = _parity_inputs(b, seq_len)
    float_acts = variant == "fp32" and qm is not None
    with torch.no_grad(), (_float_activations(layers) if float_acts else contextlib.nullcontext()):
        from .tflite_render import graph_module

        ref_module = graph_module(b, model)
        ref = [ref_module(*x).float().numpy() for x in inputs]
    got = [runner(*[t.numpy() for t in x])[0] for x in inputs]
    parity = parity_metrics(ref, got)
    if not float_acts:
        with torch.no_grad():
            add_quality_context(parity, ref_module, lambda x: ref_module(*x).float().numpy(), inputs, ref, got,
                                b.kind == "causal-lm")
    signatures = None
    if cache_len:
        step = TfliteRunner(buf, threads=1, signature="decode")
        parity["decode"], steps = tflite_decode.parity(step, runner, inputs[0][0].numpy(), ref[0], got[0], cache_len)
        if static_slots is None:
            parity["decode"]["resized"] = tflite_decode.resized_parity(buf, inputs[0][0].numpy(), steps, cache_len)
        signatures = {"serving_default": {"inputs": _input_meta(runner, b)},
                      "decode": {"inputs": _decode_input_meta(step, b, cache_len, static_slots is None)}}
        del step
    xnnpack = _xnnpack_coverage(buf, ["serving_default"] + (["decode"] if cache_len else []))
    cos_tol, top1_tol = TOLERANCE[variant]
    step_parity = parity.get("decode", {})
    reference = "PyTorch fp32" if qm is None else "PyTorch simulation" + (" with float activations" if float_acts else "")
    parity.update({"reference": reference,
                   "runtime": f"{runtime_version()} XNNPACK, 1 thread",
                   "tolerance": {"cos_min": cos_tol, "top1_agree": top1_tol},
                   "within_tolerance": bool(parity["cos_min"] >= cos_tol and (parity["top1_agree"] or 1.0) >= top1_tol
                                            and step_parity.get("cos_min", 1.0) >= cos_tol
                                            and step_parity.get("after_prefill", {}).get("cos_min", 1.0) >= cos_tol
                                            and step_parity.get("resized", {}).get("max_abs_vs_declared", 0.0) <= RESIZED_MAX_ABS)})

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
                  "fused": _fused_meta(buf, fused)},
        # per signature, what `edgeq profile --signature NAME` feeds (the top-level `inputs` are serving_default's)
        "signatures": signatures,
        "runtime_min": {**RUNTIME_MIN["int16x8" if wide else variant], "tested": f"{runtime_version()} (XNNPACK)"},
        "conventions": CONVENTIONS,
        "readback": None if check is None else {"layers": len(check["layers"]), "mismatches": check["mismatches"][:20],
                                                "per_layer": check["layers"]},
        "timing_s": {"convert": round(convert_s, 2), "quantize": round(quantize_s, 2), "fuse": round(fuse_s, 2)},
        "exact_integers": None if check is None else bool(check["exact"]),
        "bn_folded": {n: f.norm for n, f in folds.items()} or None,
        "layers_not_in_file": {"layers": unused, "reason": "the exported outputs do not depend on them; the converter drops them"}
        if unused else None,
        "tools": _tool_versions(),
    }
    if folds:
        extra["scale_note"] = ("TFLite has no separate BatchNorm: each BatchNorm after a quantized conv is folded on "
                               "edgeq's grid, so the file holds edgeq's integers with scales fp32(scale * gamma / "
                               "sqrt(var + eps)) (read back bitwise as such); exact is false because the scales are not edgeq's")
    if variant in FULL_INTEGER:
        extra["output_grids"] = (f"each integer layer's output is requantized to int{FULL_INTEGER[variant]}"
                                 f"{' (int16 in its 16x8 layers)' if wide and variant == 'int8' else ''} on a grid ai-edge-quantizer "
                                 f"calibrated on {calib_samples} calibration inputs, one grid per layer in every signature "
                                 "(not part of the edgeq simulation)")
    if wide and variant == "int8":
        extra["int16x8_layers"] = {"layers": wide, "note": "the recipe's 16-bit layers: int16 activations in and out, int8 weights, "
                                                           "on LiteRT's built-in kernels (XNNPACK runs the int8 layers)"}
    try:
        return write_export_meta(out, fmt="tflite", variant=variant, model=b.reference,
                                 qdir=source if qm is not None else None, recipe=qm.recipe.name if qm is not None else None,
                                 exact=exact, parity=parity, inputs=_input_meta(runner, b), extra=extra)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _fused_meta(buf: bytes, fused: dict[int, list[list[str]]]) -> dict | None:
    """Per signature, how many groups of sibling FULLY_CONNECTEDs `tflite_fuse` made one op, and the groups' edgeq layers."""
    from .tflite_graph import labelled, schema

    if not fused:
        return None
    root = schema().Model.GetRootAs(buf, 0)
    names = {root.SignatureDefs(i).SubgraphIndex(): root.SignatureDefs(i).SignatureKey().decode()
             for i in range(root.SignatureDefsLength())}
    out = {}
    for index, groups in fused.items():
        layers = [[found[0] for found in map(labelled, g) if found] for g in groups]
        out[names.get(index, f"subgraph {index}")] = {"groups": len(groups), "ops_removed": sum(len(g) - 1 for g in groups),
                                                      "layers": [g for g in layers if g] or None}
    return out


def _xnnpack_coverage(buf: bytes, signatures: list[str]) -> dict:
    from .tflite_check import xnnpack_coverage
    from .tflite_runtime import runtime_version

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
