"""The analysis stage of `--recipe auto` (mixed.py): which layers are candidates, in which formats, and what each
format is predicted to cost them.

`analyze` folds norms where the options say so and BatchNorms into their convolutions (as `quantize_model` folds
them), then measures every candidate's Fisher sensitivity, weight variance and input kurtosis, and tabulates its
predicted loss increase and stored bytes at each format. Linear layers are candidates at the allowed bit-widths.
Plain convolutions (groups = 1) are candidates at 8 bits per channel, the one convolution format runtimes run, or
float (`FLOAT_BITS`: their fp32 bytes, no predicted loss); depthwise ones only with static activations, grouped ones
never (`candidate_convolutions` says why). Sizes are computed exactly as quant.json counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

from ..errors import EdgeqError
from ..models import ModelBundle
from ..recipe import ActSpec, WeightSpec
from .allocate import Choice
from .mixed_formats import STATIC_GRID, MixedOptions
from .qmodel import model_float_bytes
from .sensitivity import LayerSensitivity, Objective, fisher_sensitivity, mean_loss, predicted_loss
from .transforms import fold_batchnorms, fold_norms, head_name, is_tied

FLOAT_BITS = 32  # a convolution's choice to stay float: its fp32 weight bytes, no predicted loss


@dataclass
class Analysis:
    """Everything measured before bits are chosen; reusable across budgets for the same model."""

    layers: dict[str, LayerSensitivity]
    specs: dict[int, WeightSpec]  # bits -> weight format of a Linear layer
    table: dict[str, dict[int, float]]  # layer -> bits -> predicted loss increase (a convolution's: 8 and FLOAT_BITS)
    bytes_table: dict[str, dict[int, int]]  # layer -> bits -> stored bytes (quant.json accounting)
    fixed_bytes: int  # every float tensor that stays float (candidates' weights excluded)
    fp32_bytes: int  # the float model's size (quant.json bytes_before)
    base_loss: float
    objective: str
    forced: list[str] = field(default_factory=list)
    target: dict = field(default_factory=dict)
    folded_norms: bool = True  # the analysis ran on a norm-folded model (the quantized model must be folded too)
    convolutions: dict = field(default_factory=dict)  # those float whatever the plan: count, bytes, why
    conv_specs: dict[int, WeightSpec] = field(default_factory=dict)  # bits -> weight format of a candidate convolution
    folded_batchnorms: dict = field(default_factory=dict)  # conv -> BatchNorm folded into it before the analysis
    layer_specs: dict = field(default_factory=dict)  # layer -> bits -> its own format, or None (`fit_blocks`)

    def restrict(self, bits: Iterable[int]) -> "Analysis":
        """The same analysis with fewer candidate bit-widths (e.g. another target's set)."""
        keep = sorted(set(bits) & set(self.specs))
        if not keep:
            raise EdgeqError(f"--bits: none of {sorted(set(bits))} was analysed (analysed: {sorted(self.specs)})")
        kept = set(keep) | {FLOAT_BITS}
        return replace(self, specs={b: self.specs[b] for b in keep},
                       conv_specs={b: s for b, s in self.conv_specs.items() if b in kept},
                       layer_specs={n: {b: s for b, s in t.items() if b in kept} for n, t in self.layer_specs.items()},
                       table={n: {b: v for b, v in t.items() if b in kept} for n, t in self.table.items()},
                       bytes_table={n: {b: v for b, v in t.items() if b in kept} for n, t in self.bytes_table.items()},
                       target={**self.target, "bits": keep})

    def is_conv(self, name: str) -> bool:
        return len(self.layers[name].shape) == 4

    def spec(self, name: str, bits: int) -> WeightSpec | None:
        """The weight format of `name` at `bits` (None: float)."""
        if bits == FLOAT_BITS:
            return None
        if self.is_conv(name):
            return self.conv_specs[bits]
        own = self.layer_specs.get(name, {})
        return own[bits] if bits in own else self.specs[bits]

    def choices(self, name: str) -> list[Choice]:
        """`name`'s choices, smallest first."""
        return sorted((Choice(b, self.bytes_table[name][b], loss) for b, loss in self.table[name].items()),
                      key=lambda c: (c.bytes, c.bits))


def candidate_layers(model: torch.nn.Module, options: MixedOptions) -> list[str]:
    """Linear layers mixed precision chooses bits for (a tied head stays float: untying would add bytes)."""
    import re

    head = head_name(model)
    tied = is_tied(model)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if tied and name == head:
            continue
        if options.skip and re.search(options.skip, name):
            continue
        out.append(name)
    return out


def candidate_convolutions(model: torch.nn.Module, options: MixedOptions, conv_specs: dict[int, WeightSpec],
                           why_float: str | None) -> tuple[list[str], dict]:
    """(the convolutions a plan may quantize or keep float, what stays float whatever the plan: count, bytes, why).

    A candidate is a plain Conv2d (groups = 1) that edgeq quantizes (`ptq.quantizable`), when the runtime has a
    convolution format (`conv_specs`; otherwise `why_float` says why not); with static activations a depthwise one
    too, which both runtimes run on integer kernels (unless GPTQ, which takes no depthwise convolution, applies the
    bits). With dynamic ones a depthwise convolution stays float: XNNPACK, LiteRT's CPU path, has no dynamically
    quantized depthwise kernel and leaves it on TFLite's hybrid one, which split EfficientNet-Lite0's graph in 17
    partitions (the w8 preset skips them too). A grouped one has no quantized TFLite kernel."""
    import re

    from .ptq import layer_kinds, quantizable

    static = options.activation == "static"
    out, left, reasons = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        kind = quantizable(module)
        depthwise = kind == "conv2d" and "depthwise" in layer_kinds(module, kind)
        if options.skip and re.search(options.skip, name):
            reason = "--skip"
        elif kind != "conv2d":
            reason = "not a Conv2d edgeq quantizes"
        elif not conv_specs:
            reason = why_float or "no convolution format was asked for"
        elif depthwise and not static:
            reason = "XNNPACK has no dynamically quantized depthwise kernel (static activations have one)"
        elif depthwise and options.method != "rtn":
            reason = f"{options.method} takes no depthwise convolution (--method rtn does)"
        elif module.groups != 1 and not depthwise:
            reason = "TFLite has no quantized kernel for grouped convolutions other than depthwise"
        else:
            out.append(name)
            continue
        left.append(module)
        reasons.append(reason)
    floats = {"count": len(left), "bytes": sum(m.weight.numel() * 4 for m in left)}
    if left:
        floats["why"] = "; ".join(dict.fromkeys(reasons))
    return out, floats


def spec_bytes(shape: tuple, spec: WeightSpec, act: ActSpec | None = None) -> int:
    """Stored bytes of one layer, as `qmodel.layer_bytes` counts them (integers + scales + zero points)."""
    out, numel = shape[0], math.prod(shape)
    cols = numel // out
    groups = math.ceil(cols / spec.group_size) if spec.granularity == "group" else 1
    n_scales = out * groups  # per-tensor scales are stored expanded to one per row, as rtn does
    scale_bytes = 2 if spec.scale_dtype == "bf16" else 4
    zp_bits = 0 if spec.symmetric else spec.bits
    meta = n_scales * scale_bytes + math.ceil(n_scales * zp_bits / 8)
    if act is not None and act.mode == "static":
        meta += 5
    return math.ceil(numel * spec.bits / 8) + meta


def analyze(bundle: ModelBundle, calib_batches, specs: dict[int, WeightSpec], options: MixedOptions = MixedOptions(),
            progress=None, conv_specs: dict[int, WeightSpec] | None = None, conv_float_why: str | None = None,
            layer_specs: dict | None = None) -> Analysis:
    """Fold norms if `options` says so and BatchNorms into their convolutions (quantize_model then folds too), then
    measure every candidate layer's sensitivity. `conv_specs`: the convolution formats (`mixed_formats.conv_bit_specs`);
    without them convolutions stay float, `conv_float_why` says why. `layer_specs`: Linear layers' own formats where
    `specs`' do not fit them (`mixed_formats.fit_blocks`; None: that bit-width is not theirs)."""
    model = bundle.module.eval()
    batches = list(calib_batches or [])
    if not batches:
        raise EdgeqError("--recipe auto needs calibration data to measure layer sensitivity: pass --calib")
    if options.sensitivity_batches:
        batches = batches[: options.sensitivity_batches]
    fp32_bytes = model_float_bytes(model)
    folded = options.folds(specs)
    if folded:
        fold_norms(model)
    example = tuple(bundle.example_inputs or ())
    folded_bn = fold_batchnorms(model, example) if example else {}
    conv_specs = dict(conv_specs or {})
    linears = candidate_layers(model, options)
    convs, left_float = candidate_convolutions(model, options, conv_specs, conv_float_why)
    names = [n for n, _ in model.named_modules() if n in set(linears) | set(convs)]  # in the model's order
    if not names:
        raise EdgeqError(f"--recipe auto: {bundle.reference!r} has no Linear layer or plain convolution to quantize")
    layer_specs = dict(layer_specs or {})
    formats_of = {name: conv_specs if name in convs else {
        b: s for b, s in {**specs, **layer_specs.get(name, {})}.items() if s is not None} for name in names}
    for name, formats in formats_of.items():
        if not formats:  # before the sensitivity pass, which takes the time
            raise EdgeqError(f"--recipe auto: layer {name} (input width {model.get_submodule(name).weight.shape[1]}) has "
                             f"no format among the allowed bit-widths {sorted(specs)} on this runtime; allow 8 (--bits)")
    objective = Objective(bundle.is_lm)
    with torch.no_grad():
        base = mean_loss(model, batches, objective)
    sens = fisher_sensitivity(model, names, batches, objective, progress)
    table, bytes_table = {}, {}
    act = ActSpec.from_dict(STATIC_GRID) if options.activation == "static" else None  # a static grid's scale + zero point
    for name, formats in formats_of.items():
        w = model.get_submodule(name).weight
        table[name] = {b: predicted_loss(sens[name], w, s) for b, s in formats.items()}
        bytes_table[name] = {b: spec_bytes(tuple(w.shape), s, act) for b, s in formats.items()}
        if name in convs:
            table[name][FLOAT_BITS], bytes_table[name][FLOAT_BITS] = 0.0, w.numel() * 4
    cand_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    # the float part as quant.json's bytes_after counts it: after the folds (a folded BatchNorm leaves a bias, not
    # its four tensors); the budget's share stays a share of the unfolded model, quant.json's bytes_before
    float_bytes = model_float_bytes(model)
    forced = []
    if options.outlier_kurtosis is not None:  # to the widest Linear format (a convolution's widest is float)
        forced = [n for n in linears if sens[n].kurtosis > options.outlier_kurtosis]
    return Analysis(sens, specs, table, bytes_table, float_bytes - cand_bytes, fp32_bytes, base, objective.name, forced,
                    folded_norms=folded, convolutions=left_float, conv_specs=conv_specs, folded_batchnorms=folded_bn,
                    layer_specs=layer_specs)
