"""What LiteRT can hold of edgeq's grids: the TFLite variants, their conventions, and the refusals.

`check_representable` refuses, before anything is converted, a grid a variant cannot carry bit for bit, naming the
nearest variant or recipe that works; `representability` is what quant.json says of a QDIR at quantize time (the
same checks, per variant). Nothing here converts or re-quantizes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EdgeqError

VARIANTS = ("fp32", "dynamic-int8", "int8", "int16x8", "int4")
FULL_INTEGER = {"int8": 8, "int16x8": 16}  # variant -> the static activation bits it holds
CONVENTIONS = {
    "int8_weights": "symmetric narrow range [-127, 127], zero point 0, float32 scale per output channel",
    "int4_weights": "symmetric [-8, 7], scale = absmax / 7, zero point 0; blockwise scales stored as fp16 holding bf16 values",
    "int8_activations": "static: int8 per-tensor, zero point = edgeq's uint8 zero point - 128 (same real grid)",
    "int16_activations": "static (16x8): int16 per-tensor, symmetric, zero point 0, saturating at [-32768, 32767]",
    "dynamic_activations": "LiteRT hybrid kernels: per-row asymmetric int8 computed at run time",
}
# The variants whose layers run LiteRT's hybrid kernels, and how those quantize a layer's input at run time: per row
# to asymmetric int8 (the simulation's dynamic grid per token). One FULLY_CONNECTED alone (int8 per channel, INT4
# blocks of 64; [1, 576] inputs with outliers) gave what the input on that grid times the file's weights gives, to
# 7e-7 (XNNPACK 2.3 on an Intel host, 2026-12-04).
HYBRID = ("dynamic-int8", "int4")
RUNTIME_GRID = {"mode": "dynamic", "bits": 8, "granularity": "token", "symmetric": False}


def static_bits(layers: dict) -> dict[str, int]:
    """Each layer with static activations -> their bits (8: int8, 16: LiteRT's 16x8)."""
    return {n: m.decision.activation.bits for n, m in layers.items() if m.decision.activation.mode == "static"}


def off_runtime_grid(layers: dict) -> list[str]:
    """The linear layers whose recipe puts their input on another grid than the one LiteRT's hybrid kernels compute
    at run time (`RUNTIME_GRID`; the `-litert` presets use it): in a dynamic-int8 or int4 file those layers depart
    from the simulation by the difference, which FILE.json `parity.runtime_grid` measures."""
    return sorted(n for n, m in layers.items() if m.decision.kind == "linear"
                  and {k: getattr(m.decision.activation, k) for k in RUNTIME_GRID} != RUNTIME_GRID)


def hybrid_activations(layers: dict) -> dict:
    """What quant.json and FILE.json say of a hybrid variant's activations: whether the file computes on the recipe's
    grid."""
    off = off_runtime_grid(layers)
    if not off:
        return {"as_recipe": True, "activations": "the recipe's grid is the one LiteRT's hybrid kernels compute at run time "
                                                  "(each row of a linear layer's input to asymmetric int8)"}
    a = layers[off[0]].decision.activation
    has = f"{a.bits}-bit {a.mode} {'symmetric' if a.symmetric else 'asymmetric'} per {a.granularity}" if a.quantized else "float"
    return {"as_recipe": False,
            "activations": f"LiteRT's hybrid kernels quantize each row of the input of {len(off)} linear "
                           f"layer{'s' if len(off) > 1 else ''} to asymmetric int8 at run time, where the recipe has "
                           f"another grid ({off[0]}: {has}): the file departs from the "
                           "simulation by that (FILE.json parity.runtime_grid); the -litert recipes simulate the run-time grid"}


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


def grouped_conv_refusal(name: str) -> str:
    return (f"tflite: layer {name}: grouped convolutions other than depthwise have no quantized TFLite kernel (float "
            f"ones convert); leave them float with a rule before the others (match = \"{name}$\", skip = true), or export "
            "--format onnx (QLinearConv takes groups)")


def check_representable(qm, variant: str) -> None:
    """Refuse grids the variant cannot hold, naming what would work. Never re-quantizes."""
    try:
        _check_representable(qm, variant)
    except EdgeqError as exc:
        planned_for = ((qm.extra.get("mixed") or {}).get("target") or {}).get("format") if qm is not None else None
        if qm is None or qm.recipe.name != "auto" or planned_for == "tflite":
            raise
        raise EdgeqError(f"{exc}; for a mixed-precision plan, quantize with --recipe auto --runtime litert-xnnpack "
                         "(its plan holds LiteRT's grids)") from None


def _check_representable(qm, variant: str) -> None:
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
        if d.kind == "conv2d" and m.groups != 1 and not m.groups == m.in_channels == m.out_channels:
            raise EdgeqError(grouped_conv_refusal(name))  # (depthwise convs are DEPTHWISE_CONV_2D)
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
    with; and, for a recipe with fold_batchnorms = false, that a BatchNorm after a quantized conv will be folded into
    its scales (integers kept, scales not)."""
    variants = {}
    for variant in VARIANTS[1:]:
        try:
            check_representable(qm, variant)
            variants[variant] = {"representable": True} | (hybrid_activations(qm.layers()) if variant in HYBRID else {})
        except EdgeqError as exc:
            variants[variant] = {"representable": False, "why": str(exc).removeprefix("tflite: ")}
    convs = [m for m in qm.layers().values() if m.decision.kind == "conv2d"]
    # a recipe with fold_batchnorms (the default) has folded every norm the export could (transforms.fold_batchnorms)
    batchnorm = convs and not qm.recipe.fold_batchnorms and any(isinstance(m, torch.nn.BatchNorm2d) for m in qm.model.modules())
    return {"default_variant": default_variant(qm), "variants": variants, "conventions": CONVENTIONS,
            "note": ("a BatchNorm after a quantized conv is folded at export on edgeq's grid: the file holds edgeq's integers "
                     "with scales times the BatchNorm factor (FILE.json exact: false)") if batchnorm else None}
