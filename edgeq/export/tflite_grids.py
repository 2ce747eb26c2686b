"""What LiteRT can hold of edgeq's grids: the TFLite variants, their conventions, and the refusals.

`check_representable` refuses, before anything is converted, a grid a variant cannot carry bit for bit, naming the
nearest variant or recipe that works; `representability` is what quant.json says of a QDIR at quantize time (the
same checks, per variant). Nothing here converts or re-quantizes.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

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
    "dynamic_activations": "LiteRT hybrid kernels: asymmetric int8 computed at run time, per row of a fully-connected "
                           "layer's input, per pixel of a 1x1 convolution's, per image of any other convolution's",
}
# The variants whose layers run LiteRT's hybrid kernels, and how those quantize a layer's input at run time: to
# asymmetric int8 (XNNPACK's qd8), one grid per row of a linear layer's input (the simulation's dynamic grid per
# token). One FULLY_CONNECTED alone (int8 per channel, INT4 blocks of 64; [1, 576] inputs with outliers) gave what the
# input on that grid times the file's weights gives, to 7e-7 (XNNPACK 2.3 on an Intel host, 2026-12-04).
HYBRID = ("dynamic-int8", "int4")
RUNTIME_GRID = {"mode": "dynamic", "bits": 8, "granularity": "token", "symmetric": False}
# A convolution's input has no token axis: a recipe's dynamic grid for it spans the whole tensor (`ptq`), which is
# LiteRT's run-time grid for a convolution that quantizes per image (`runtime_input_dims`).
CONV_RUNTIME_GRID = {**RUNTIME_GRID, "granularity": "tensor"}
RUNTIME_KINDS = ("linear", "conv2d")  # the layers whose input a hybrid kernel quantizes at run time


def runtime_input_dims(m) -> tuple[int, ...]:
    """The dims of a quantized layer's input that one run-time grid spans in LiteRT's hybrid kernels. Measured
    2026-12-06 (ai-edge-litert 2.3, XNNPACK, on x86): one probe layer per case whose int8 weights pass its input
    through, fed 8-bit pixel values normalised to [-1, 1] (most on a rounding tie), matched `xnnpack_qd8` over these
    dims to 6e-8:
    - a linear layer: each row (its last dim);
    - a 1x1 convolution with stride 1, which XNNPACK runs as a fully-connected layer: each pixel (its channels;
      padded or not: the file pads in a PAD op before it, and a probe with padding 1 quantized per pixel too);
    - any other convolution: each image (channels, height and width; batch 1). So does TFLite's built-in hybrid
      depthwise kernel, which XNNPACK leaves a dynamic-range DEPTHWISE_CONV_2D to, but in other arithmetic: 1 of
      131,072 Gaussian inputs a step away, and 24% of a photo's, which sit on rounding ties (`xnnpack_qd8`)."""
    if m.decision.kind == "linear":
        return (-1,)
    return (1,) if tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1) else (1, 2, 3)


def xnnpack_qd8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """`x` on XNNPACK's dynamic asymmetric int8 grid, one grid per slice over `dims`, in XNNPACK's float32
    arithmetic (`xnn_f32_qd8_asymmetric_quantization_params`, then f32-qs8-vcvt): the range widened to hold 0,
    the multiplier m = 255 / (max - min), the zero point chosen from whichever end errs less and rounded, and
    q = rint(x * m) + zero point, saturated to int8, read as (q - zero point) / m. Not `act_qparams`' x / scale
    (ONNX Runtime's DynamicQuantizeLinear): on a tie the two round apart. Photos normalised as
    `(pixel / 255 - 0.5) / 0.5` sit on a tie of a [-1, 1] image's grid, and x / scale broke 17% of them otherwise
    than the file (a 3x3 probe convolution; x * m none)."""
    lo = torch.clamp(x.detach().amin(dim=dims, keepdim=True), max=0.0)
    hi = torch.clamp(x.detach().amax(dim=dims, keepdim=True), min=0.0)
    # float32's quotient, as XNNPACK divides: torch's `scalar / tensor` multiplies by a reciprocal, an ulp off at
    # times (0.1% of a 1x1 probe convolution's values then landed a step away); a double quotient rounds to it
    m = torch.where(hi > lo, 255.0 / (hi - lo).double(), 1.0).float()
    from_min, from_max = -128.0 - lo * m, 127.0 - hi * m
    zero_point = torch.where((-128.0 + lo * m) + (127.0 + hi * m) > 0, from_min, from_max)
    zero_point = torch.round(torch.clamp(zero_point, -128.0, 127.0))
    q = torch.clamp(torch.round(x * m) + zero_point, -128.0, 127.0)
    return (q - zero_point) * (1.0 / m)


@contextmanager
def on_runtime_grid(layers: dict):
    """The simulation with every linear and convolution layer's input quantized as LiteRT's hybrid kernels quantize
    it at run time (`xnnpack_qd8` over `runtime_input_dims`), in place of the recipe's grid, for a while."""
    quantized = [m for m in layers.values() if m.decision.kind in RUNTIME_KINDS]
    try:
        for m in quantized:
            m.runtime_grid = partial(xnnpack_qd8, dims=runtime_input_dims(m))
        yield
    finally:
        for m in quantized:
            m.runtime_grid = None


def static_bits(layers: dict) -> dict[str, int]:
    """Each layer with static activations -> their bits (8: int8, 16: LiteRT's 16x8)."""
    return {n: m.decision.activation.bits for n, m in layers.items() if m.decision.activation.mode == "static"}


def _on_runtime_grid(m) -> bool:
    """Whether a linear or convolution layer's recipe grid is the one LiteRT's hybrid kernels compute for it."""
    grid = {k: getattr(m.decision.activation, k) for k in RUNTIME_GRID}
    if m.decision.kind == "linear":
        return grid == RUNTIME_GRID
    return runtime_input_dims(m) == (1, 2, 3) and grid == CONV_RUNTIME_GRID  # no recipe grid is per pixel


def off_runtime_grid(layers: dict) -> list[str]:
    """The linear and convolution layers whose recipe puts their input on another grid than the one LiteRT's hybrid
    kernels compute at run time (`runtime_input_dims`; the `-litert` presets use it for linear layers): in a
    dynamic-int8 or int4 file those layers depart from the simulation by the difference, which FILE.json
    `parity.runtime_grid` measures."""
    return sorted(n for n, m in layers.items() if m.decision.kind in RUNTIME_KINDS and not _on_runtime_grid(m))


def hybrid_activations(layers: dict) -> dict:
    """What quant.json and FILE.json say of a hybrid variant's activations: whether the file computes on the recipe's
    grid."""
    off = off_runtime_grid(layers)
    if not off:
        return {"as_recipe": True, "activations": "the recipe's grid is the one LiteRT's hybrid kernels compute at run time "
                                                  "(each row of a linear layer's input, each image of a convolution's, to "
                                                  "asymmetric int8)"}
    a = layers[off[0]].decision.activation
    has = f"{a.bits}-bit {a.mode} {'symmetric' if a.symmetric else 'asymmetric'} per {a.granularity}" if a.quantized else "float"
    linear = sum(layers[n].decision.kind == "linear" for n in off)
    counts = [f"{k} {what}{'s' if k > 1 else ''}"
              for k, what in ((linear, "linear layer"), (len(off) - linear, "convolution")) if k]
    return {"as_recipe": False,
            "activations": f"LiteRT's hybrid kernels quantize the input of {' and '.join(counts)} to asymmetric int8 at run "
                           "time (per row of a linear layer's input, per pixel of a 1x1 convolution's, per image of "
                           f"another convolution's), where the recipe has another grid ({off[0]}: {has}): the file departs "
                           "from the simulation by that (FILE.json parity.runtime_grid); the -litert recipes simulate the "
                           "run-time grid of linear layers"}


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
