"""Which weight formats and grids `--recipe auto` may use: a target runtime's, or an explicit bit set.

`MixedOptions` is how `auto` chooses. `allowed_bit_specs` asks the board profile which Linear weight formats its runtime runs natively with the chosen
activations and gives one `WeightSpec` per bit-width; for a TFLite runtime in LiteRT's conventions (bf16-exact block
scales, per-row asymmetric int8 activations, `fit_blocks`: blocks that divide every input width, `embedding_table`:
the `[embedding]` table it holds). `mixed.py` measures and allocates over these formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

from ..errors import EdgeqError, choice_error
from ..recipe import ActSpec, WeightSpec
from .methods import METHODS

ALL_BITS = (2, 3, 4, 5, 6, 8)
MEASURE = ("none", "model", "layers")
ACTIVATIONS = ("none", "dynamic", "static")


@dataclass(frozen=True)
class MixedOptions:
    """How `auto` chooses: the format of each bit-width, what is measured, which layers are forced."""

    group_size: int | None = 128  # for bits < 8; None = per channel
    symmetric: bool = True
    eight_bit_granularity: str = "channel"  # 8-bit layers: channel, or group (with group_size)
    activation: str | None = "none"  # none (weight-only) | dynamic (int8 per token, on the fly) | static (int8 per
    # tensor, calibrated: a full-integer file, 8-bit weights only) | None: the runtime's own (dynamic on a TFLite
    # runtime, whose INT4 / INT8 kernels quantize activations at run time; none otherwise)
    method: str = "rtn"  # how the chosen bits are applied: rtn | gptq
    runtime: str | None = None  # the target's runtime to ask (default: its default runtime)
    allow_fallback: bool = False  # also use bit-widths the runtime runs only through a fallback
    outlier_kurtosis: float | None = None  # force layers whose input kurtosis exceeds this to 8-bit
    measure: str = "model"  # none | model (the final model's loss) | layers (also each layer alone)
    skip: str | None = None  # regex of layer names to keep float
    sensitivity_batches: int | None = None  # use only the first N calibration batches for the analysis
    embedding_bits: int | None = None  # also quantize the input embedding (and a tied head with it) per row; None = float
    # fold norm gains into the linears they feed before analysis and quantization; None: only when every candidate
    # format is 8-bit (a gain folded into 4-bit groups widens each group's range, as the INT4 presets measured)
    fold_norms: bool | None = None

    def __post_init__(self):
        if self.activation not in (*ACTIVATIONS, None):
            raise choice_error("mixed.activation", self.activation, ACTIVATIONS)
        if self.method not in METHODS:
            raise choice_error("mixed.method", self.method, sorted(METHODS))
        if self.measure not in MEASURE:
            raise choice_error("mixed.measure", self.measure, MEASURE)
        if self.embedding_bits is not None and not 2 <= self.embedding_bits <= 8:
            raise EdgeqError(f"--embedding-bits: {self.embedding_bits} is not in 2..8")
        if self.eight_bit_granularity not in ("channel", "group"):
            raise choice_error("mixed.eight_bit_granularity", self.eight_bit_granularity, ("channel", "group"))
        if self.group_size is not None and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise EdgeqError(f"--group-size: {self.group_size} is not a power of two >= 8")

    def folds(self, specs: dict[int, WeightSpec]) -> bool:
        """Whether norms are folded for this set of candidate formats."""
        return self.fold_norms if self.fold_norms is not None else min(specs) >= 8



DYNAMIC_GRID = {"mode": "dynamic", "granularity": "token"}  # `activation = "dynamic"`: int8 per token (ActSpec's defaults)
# ... on a TFLite runtime: LiteRT's hybrid kernels quantize each row of a layer's input to asymmetric int8 (XNNPACK qd8)
LITERT_DYNAMIC_GRID = {"mode": "dynamic", "bits": 8, "granularity": "token", "symmetric": False}


# `activation = "static"`: the w8a8-static preset's grid, int8 per tensor from calibration (uint8 in ONNX, int8 with the
# zero point - 128 in TFLite: the same real grid), which full-integer files hold
STATIC_GRID = {"mode": "static", "bits": 8, "calibration": "percentile", "percentile": 99.999}


def activation_grid(mode: str, fmt: str | None) -> dict:
    """The activation table of every rule `auto` writes: float (`none`), the per-token int8 grid the runtime's
    kernels compute (LiteRT's asymmetric rows for a TFLite runtime, edgeq's symmetric ones otherwise), or the static
    per-tensor grid of a full-integer file."""
    if mode == "none":
        return {"mode": "none"}
    if mode == "static":
        return STATIC_GRID
    return LITERT_DYNAMIC_GRID if fmt == "tflite" else DYNAMIC_GRID


def allowed_bit_specs(target: str | None, allowed_bits: Iterable[int] | None, options: MixedOptions) -> tuple[dict[int, WeightSpec], dict]:
    """bits -> WeightSpec that mixed precision may use; from the target profile and/or an explicit set.

    The one place that asks a board profile which weight formats run natively for a Linear
    (`TargetProfile.weight_options`); an explicit set narrows the target's set.
    """
    explicit = None
    if allowed_bits is not None:
        explicit = sorted({int(b) for b in allowed_bits})
        bad = [b for b in explicit if b not in ALL_BITS]
        if bad or not explicit:
            raise EdgeqError(f"--bits: {bad[0] if bad else 'empty'!r} is not a bit-width mixed precision uses (allowed: {', '.join(map(str, ALL_BITS))})")
    gs = options.group_size
    if target is None:
        if explicit is None:
            raise EdgeqError("--recipe auto: pass --target NAME or an explicit --bits set (e.g. --bits 2,3,4,8)")
        specs = {b: _spec(b, options, "group" if (b < 8 or options.eight_bit_granularity == "group") and gs else "channel", gs)
                 for b in explicit}
        return specs, {"name": None, "bits": explicit, "source": "--bits",
                       "activation_grid": activation_grid(options.activation or "none", None)}
    from ..targets import load_profile
    from ..targets.uses import onnx_dynamic_form, op_act

    profile = load_profile(target)
    support = ("native", "fallback") if options.allow_fallback else ("native",)
    rt = profile.runtime(options.runtime)
    runtime = rt.name
    mode = options.activation or ("dynamic" if rt.format == "tflite" else "none")
    # a static grid is int8 (uint8 in ONNX) at the op; weight-only is asked as fp32 activations in both formats
    act = op_act(mode, rt.format) if mode == "static" else "fp32" if mode == "none" else "dynamic"
    # LiteRT stores block scales in 16 bits: bf16-exact scales are what a TFLite file holds bitwise
    scale_dtype = "bf16" if rt.format == "tflite" else None
    if rt.format == "onnx" and act == "dynamic":
        # as the export renders the per-token grid (build_recipe's): before some weight formats as float ops,
        # so the layer's op reads float inputs; each format is judged by the op its layer becomes
        g = ActSpec(**DYNAMIC_GRID)
        opts = [o for o in profile.weight_options(runtime, kind="linear", acts=("dynamic", "fp32"), support=support)
                if o.act == ("fp32" if onnx_dynamic_form(True, o.bits, o.group_size, g.bits, g.symmetric, g.granularity)
                             == "float" else "dynamic")]
    else:
        opts = profile.weight_options(runtime, kind="linear", acts=(act,), support=support)
    specs, blocks, channels = {}, {}, {}
    for bits in sorted({o.bits for o in opts}):
        if explicit is not None and bits not in explicit:
            continue
        signed = options.symmetric or bits == 8  # 8-bit weights are always symmetric (see _spec)
        mine = [o for o in opts if o.bits == bits and o.dtype.startswith("int" if signed else "uint")]
        if not mine:
            continue
        grans = {(o.granularity, o.group_size) for o in mine}
        blocks[bits] = sorted(s for g, s in grans if g == "group")
        channels[bits] = ("channel", None) in grans
        prefer_group = bits < 8 or options.eight_bit_granularity == "group"
        if prefer_group and gs is not None and ("group", gs) in grans:
            specs[bits] = _spec(bits, options, "group", gs, scale_dtype)
        elif ("channel", None) in grans:
            specs[bits] = _spec(bits, options, "channel", None)
        elif any(g == "group" for g, _ in grans):
            sizes = sorted(s for g, s in grans if g == "group")
            pick = min(sizes, key=lambda s: (abs(math.log2(s) - math.log2(gs or 128)), -s))
            specs[bits] = _spec(bits, options, "group", pick, scale_dtype)
    if not specs:
        wanted = f"{','.join(map(str, explicit))}-bit " if explicit else ""
        others = [name for name in profile.runtimes if name != runtime]
        hints = ["--allow-fallback", "--bits with other widths"] + (
            ["--activation dynamic"] if mode == "none" else ["--activation none"]) + [f"--runtime {r}" for r in others]
        raise EdgeqError(f"--target {profile.name}: runtime {runtime} runs no {wanted}{'signed' if options.symmetric else 'unsigned'} "
                         f"Linear weight format natively with activations {act} (try {', '.join(hints)})")
    conv = profile.weight_options(runtime, kind="conv", acts=(act,), support=support)
    info = {"name": profile.name, "runtime": runtime, "format": rt.format, "activation": act,
            "conv_channel_int8": any(o.bits == CONV_BITS and o.granularity == "channel" and o.dtype == "int8" for o in conv),
            "activation_grid": activation_grid(mode, rt.format), "support": list(support), "bits": sorted(specs),
            "block_sizes": {b: blocks[b] for b in specs}, "channel_bits": [b for b in specs if channels[b]],
            "source": profile.path}
    return specs, info


CONV_BITS = 8  # the one convolution weight format runtimes run: 8 bits per output channel, symmetric


def conv_bit_specs(target_info: dict, options: MixedOptions,
                   allowed_bits: Iterable[int] | None = None) -> tuple[dict[int, WeightSpec], str | None]:
    """(bits -> WeightSpec a plain convolution may take, why none when empty), for the target `allowed_bit_specs`
    described (`conv_channel_int8`: its runtime runs int8 per-channel convolutions with those activations) and the
    explicit --bits. A convolution takes 8-bit per-channel weights or stays float
    (`mixed.FLOAT_BITS`): no runtime has blockwise convolution kernels, and the profiles list no 4-bit one. The profile
    is asked as for Linear layers, with the same activations (an ONNX Runtime Conv runs integer kernels only with
    static activations: without `--activation static` its convolutions stay float unless --allow-fallback stores
    them 8-bit)."""
    spec = _spec(CONV_BITS, options, "channel", None)
    if allowed_bits is not None and CONV_BITS not in set(allowed_bits):
        return {}, f"--bits has no {CONV_BITS} (convolutions take {CONV_BITS}-bit per-channel weights or stay float)"
    if target_info.get("name") is None or target_info["conv_channel_int8"]:
        return {CONV_BITS: spec}, None
    runtime, act = target_info["runtime"], target_info["activation"]
    hint = "" if "fallback" in target_info["support"] else " (--allow-fallback stores them 8-bit, run as float)"
    return {}, f"{runtime} runs no {CONV_BITS}-bit per-channel convolution natively with activations {act}{hint}"


def fit_blocks(specs: dict[int, WeightSpec], widths: dict[str, int],
               target_info: dict) -> tuple[dict[int, WeightSpec], dict[str, dict[int, WeightSpec | None]]]:
    """On a TFLite runtime, which has no short last block (the export refuses one), each grouped format takes the
    largest block size the runtime runs, up to the asked one, that divides every candidate layer's input width
    (SmolLM2's 576 and 1536: 64, not 128). Where none divides them all (MobileViT's 144-wide layers, a small model's
    16-wide ones), the format takes the block size that divides the most widths, and each other layer its own: the
    largest block dividing its width, else one scale per row where the runtime runs that (LiteRT: INT4 per channel),
    else no format of that bit-width. Returns (the formats, {layer: {bits: its own format, or None}}). Other runtimes
    pad the last block: `specs` as they are."""
    if target_info.get("format") != "tflite":
        return specs, {}
    out, own = dict(specs), {}
    for bits, spec in specs.items():
        if spec.granularity != "group" or all(w % spec.group_size == 0 for w in widths.values()):
            continue
        sizes = [b for b in target_info["block_sizes"].get(bits, []) if b <= spec.group_size] or [spec.group_size]
        common = max(sizes, key=lambda b: (sum(w % b == 0 for w in widths.values()), b))
        out[bits] = replace(spec, group_size=common)
        per_row = replace(spec, granularity="channel", group_size=None, scale_dtype="fp32") \
            if bits in target_info.get("channel_bits", ()) else None
        for name, width in widths.items():
            if width % common:
                fits = [b for b in sizes if width % b == 0]
                own.setdefault(name, {})[bits] = replace(spec, group_size=max(fits)) if fits else per_row
    return out, own


def _spec(bits: int, options: MixedOptions, granularity: str, group_size: int | None,
          scale_dtype: str | None = None) -> WeightSpec:
    sym = options.symmetric or bits == 8  # 8-bit is symmetric by edgeq's convention (LiteRT narrow range)
    return WeightSpec.from_dict({"bits": bits, "symmetric": sym, "granularity": granularity,
                                 **({"group_size": group_size} if granularity == "group" else {}),
                                 **({"scale_dtype": scale_dtype} if scale_dtype else {})})


def embedding_table(bits: int, target_info: dict) -> dict:
    """The recipe's `[embedding]` table for `--embedding-bits`: b-bit rows with one scale each; for a TFLite runtime, at
    4 bits blocks of 32 with bf16 scales (as the preset w4-g64-litert-emb4 stores them), and the tied head's input on
    LiteRT's per-row int8 grid, which its hybrid kernel computes."""
    if target_info.get("format") != "tflite":
        return {"bits": bits, "symmetric": True, "granularity": "channel"}
    table = {"bits": bits, "symmetric": True, "granularity": "channel", "head_activation": LITERT_DYNAMIC_GRID}
    if bits == 4:
        table.update(granularity="group", group_size=32, scale_dtype="bf16")
    return table


def parse_bits(text: str | Iterable[int] | None) -> list[int] | None:
    """`--bits 2,3,4,8` -> [2, 3, 4, 8]; None stays None (the target decides)."""
    if text is None or not isinstance(text, str):
        return None if text is None else sorted({int(b) for b in text})
    try:
        bits = sorted({int(b) for b in text.replace(" ", "").split(",") if b})
    except ValueError:
        raise EdgeqError(f"--bits: {text!r} is not a comma-separated list of bit-widths (e.g. 2,3,4,8)") from None
    bad = [b for b in bits if b not in ALL_BITS]
    if not bits or bad:
        raise EdgeqError(f"--bits: {text!r} is not a set of bit-widths from {', '.join(map(str, ALL_BITS))}")
    return bits
