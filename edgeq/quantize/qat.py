"""Quantization-aware training layers and the prepare / convert pair around them.

`prepare_qat(bundle, recipe, method)` folds norms exactly as PTQ does, then wraps every Linear the
recipe quantizes in a trainable fake-quant layer of the chosen QAT method (registry `QAT_METHODS`:
`lsq` here, `lr-qat` in lrqat.py, `pb-llm` in pbllm.py). Every method starts from the
round-to-nearest grid of the recipe (scales from `compute_qparams`, gamma included).
`convert_qat(prepared)` turns the trained layers into ordinary `QuantLinear` integers + scales, so
the result is the same quantized-model directory PTQ writes and exports unchanged.

The training forward of every method computes exactly `(q - zp) * scale` with the integers the
conversion stores (rounding uses an exact straight-through form), so conversion is bit-exact.
This module never trains: the loop, data and checkpoints live in qat_loop.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import EdgeqError, choice_error
from ..models import ModelBundle
from ..recipe import QuantRecipe, Rule
from .modules import LayerDecision, QuantLinear, set_module
from .primitives import (
    act_qparams,
    compute_qparams,
    dynamic_fake_quant_act,
    expand_groups,
    fake_quant_act,
    qrange,
    round_scale,
    round_ste,
    storage_dtype,
)

# name -> wrapper class taking (name, linear, rule, act_qparams, options)
QAT_METHODS: dict[str, type] = {}


def register_qat(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        QAT_METHODS[name] = cls
        return cls

    return register


def scale_ste(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Positive scales, rounded to what the file stores (bf16) in the forward, straight-through in the backward."""
    s = scale.clamp_min(1e-12)
    if scale_dtype == "bf16":
        return round_scale(s, "bf16").detach() + (s - s.detach())
    return s


def trained_qrange(spec) -> tuple[int, int]:
    """The integers QAT may reach on `spec`'s grid.

    `qrange`, except that a symmetric narrow 8-bit grid stays in [-127, 127]: LiteRT's int8 weight range,
    which PTQ keeps by rounding (absmax / 127) but learned scales and moving weights could leave.
    """
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    if spec.symmetric and spec.range == "narrow" and spec.bits == 8:
        qmin = -qmax
    return qmin, qmax


def initial_grid(w: torch.Tensor, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """The RTN grid of `rule` for weight [out, in], scales and zero points shaped [out, n_groups]."""
    spec = rule.weight
    scale, zp = compute_qparams(w, spec.bits, spec.symmetric, spec.granularity, spec.group_size, rule.gamma, spec.scale_dtype,
                                 full_range=spec.range == "full")
    if scale.shape[0] == 1:
        scale, zp = scale.expand(w.shape[0], scale.shape[1]).contiguous(), zp.expand(w.shape[0], zp.shape[1]).contiguous()
    return scale, zp


class QATLayer(torch.nn.Module):
    """Shared parts of QAT linears: the rule, the bias and the activation quantizer.

    Static activation scales are LSQ-learnable too (initialised from calibration).
    """

    method = "qat"
    out_grid: tuple[int, bool] | None = None  # (bits, symmetric) of the output requantization simulated in training (set_output_grid)

    def __init__(self, name: str, linear: torch.nn.Linear, rule: Rule, act_qparams=None):
        super().__init__()
        self.name, self.rule = name, rule
        self.out_features, self.in_features = linear.weight.shape
        self.group_size = rule.weight.group_size if rule.weight.granularity == "group" else None
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        if rule.activation.mode == "static":
            if act_qparams is None:
                raise EdgeqError(f"layer {name}: static activations need calibration data for QAT")
            self.act_scale = torch.nn.Parameter(act_qparams[0].reshape(()).float().clone())
            self.register_buffer("act_zero_point", act_qparams[1].reshape(()).to(torch.int16))

    def set_output_grid(self, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool) -> None:
        """Requantize the layer's output on this fixed per-tensor grid, as a full-integer TFLite layer does."""
        self.register_buffer("out_scale", scale.reshape(()).float().clone())
        self.register_buffer("out_zero_point", zero_point.reshape(()).to(torch.int32))
        self.out_grid = (bits, symmetric)

    def quant_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_grid is None:
            return y
        return fake_quant_act(y, self.out_scale, self.out_zero_point, *self.out_grid, narrow=False)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        act = self.rule.activation
        if act.mode == "static":
            return fake_quant_act(x, self.act_scale.clamp_min(1e-12), self.act_zero_point, act.bits, act.symmetric, narrow=False)
        if act.mode == "dynamic":
            return dynamic_fake_quant_act(x, act.bits, per_token=act.granularity == "token", symmetric=act.symmetric,
                                          group_size=act.group_size if act.granularity == "group" else None)
        return x

    @staticmethod
    def needs_hessian(options: dict) -> bool:
        """Whether `prepare_qat` must collect the layer's input Hessian (PB-LLM's criterion)."""
        return False

    def weight_hat(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(F.linear(self.quant_input(x), self.weight_hat(), self.bias))

    def integers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, scale, zero_point) the conversion stores; `(q - zp) * scale` equals `weight_hat()`."""
        raise NotImplementedError

    def to_quant_linear(self) -> QuantLinear:
        with torch.no_grad():
            q, scale, zp = self.integers()
            spec = self.rule.weight
            q = q.to(storage_dtype(spec.bits, spec.symmetric))
            act = (None, None)
            if self.rule.activation.mode == "static":
                act = (self.act_scale.detach().clamp_min(1e-12).clone(), self.act_zero_point.clone())
            decision = LayerDecision(self.name, "linear", spec, self.rule.activation, f"qat-{self.method}",
                                     self.rule.gamma, (self.out_features, self.in_features))
            return QuantLinear(decision, q, scale.detach().float().contiguous(), zp, self.bias, *act)


@register_qat("lsq")
class LSQLinear(QATLayer):
    """Full QAT: latent float weights (STE through the rounding) and LSQ learnable scales.

    The scale gradient is LSQ's: -w/s + round(w/s) inside the grid, qmin - zp or qmax - zp where
    clipped. Zero points stay at their initial (RTN) value. The range multiplier gamma is therefore
    learnable too: it only sets the initial scale, which training then moves.
    """

    method = "lsq"

    def __init__(self, name, linear, rule, act_qparams=None, options=None):
        super().__init__(name, linear, rule, act_qparams)
        w = linear.weight.detach().float()
        self.weight = torch.nn.Parameter(w.clone())
        if rule.weight.quantized:
            scale, zp = initial_grid(w, rule)
            self.scale = torch.nn.Parameter(scale)
            self.register_buffer("zero_point", zp)

    def _grid(self):
        spec = self.rule.weight
        s = expand_groups(scale_ste(self.scale, spec.scale_dtype), self.in_features, self.group_size)
        z = expand_groups(self.zero_point.float(), self.in_features, self.group_size)
        return s, z

    def _q(self, s, z):
        spec = self.rule.weight
        if spec.bits == 1:
            return torch.where(self.weight >= 0, 1.0, -1.0) + (self.weight - self.weight.detach())
        qmin, qmax = trained_qrange(spec)
        return torch.clamp(round_ste(self.weight / s) + z, qmin, qmax)

    def weight_hat(self) -> torch.Tensor:
        if not self.rule.weight.quantized:
            return self.weight
        s, z = self._grid()
        return (self._q(s, z) - z) * s

    def integers(self):
        if not self.rule.weight.quantized:  # W16: the float weight itself on the identity grid
            ones = torch.ones(self.out_features, 1)
            return self.weight.detach().clone(), ones, torch.zeros_like(ones, dtype=torch.int16)
        s, z = self._grid()
        scale = scale_ste(self.scale, self.rule.weight.scale_dtype).detach()
        return self._q(s, z).detach(), scale, self.zero_point.clone()


@register_qat("scales")
class ScalesOnlyLinear(LSQLinear):
    """LSQ with the weights frozen: only the scales (and static activation scales) train."""

    method = "scales"

    def __init__(self, name, linear, rule, act_qparams=None, options=None):
        super().__init__(name, linear, rule, act_qparams, options)
        self.weight.requires_grad_(False)


@dataclass
class PreparedQAT:
    """A model whose quantized layers are QAT wrappers, plus what conversion needs to write the QDIR."""

    bundle: ModelBundle
    recipe: QuantRecipe
    method: str
    layers: dict[str, QATLayer]
    bytes_before: int
    untied: bool
    folded: list
    options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # what quant.json records of the preparation (smoothing)

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.module

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


def prepare_qat(bundle: ModelBundle, recipe: QuantRecipe, method: str = "lsq", calib_batches=None,
                options: dict | None = None) -> PreparedQAT:
    """Fold norms, then wrap every Linear the recipe quantizes in the QAT layer of `method`.

    Everything outside the wrapped layers is frozen (embeddings, norms, biases); only what each
    method declares trainable gets gradients.
    """
    from . import lrqat, pbllm  # noqa: F401  (register their QAT layers)
    from .observers import ActObserver
    from .ptq import plan
    from .qmodel import model_float_bytes
    from .transforms import fold_norms, head_name, is_tied, untie_head

    if method not in QAT_METHODS:
        raise choice_error("method", method, sorted(QAT_METHODS))
    import dataclasses

    options = {**dataclasses.asdict(recipe.pbllm), **(options or {})}
    model = bundle.module.eval()
    bytes_before = model_float_bytes(model)
    head = head_name(model)
    untied = bool(head and is_tied(model) and recipe.untie_head and recipe.rule_for(head) is not None and untie_head(model))
    folded = fold_norms(model) if recipe.fold_norms else []
    targets = plan(model, recipe)
    if not targets:
        raise EdgeqError(f"recipe {recipe.name!r}: no rule matches any Linear layer of {bundle.reference!r}")
    bad = [n for n, (kind, _) in targets.items() if kind != "linear"]
    if bad:
        raise EdgeqError(f"qat: only Linear layers are trained with QAT; {bad[0]} is a {targets[bad[0]][0]} (skip it in the recipe)")
    extra = {}
    if recipe.smoothing > 0:
        # SmoothQuant from the float model's channel maxima (exact in float), before the static activation observers
        # below, which then see the smoothed inputs: LSQ's step 0 is bitwise `edgeq quantize` with the recipe's
        # calibration.sequential = false (PTQ's default takes the maxima and ranges block by block through the blocks
        # it has already quantized)
        from .ptq import smooth_from_float

        if not calib_batches:
            raise EdgeqError(f"qat: recipe {recipe.name!r} smooths activations (smoothing = {recipe.smoothing}) and needs calibration data")
        smoothed = smooth_from_float(model, targets, recipe.smoothing, list(calib_batches))
        if smoothed:
            extra = {"smoothed_layers": len(smoothed), "smoothing_alpha": recipe.smoothing}
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}

    def build(name, obs, hess):
        act = None
        rule = targets[name][1]
        if obs is not None:
            a = rule.activation
            act = obs.qparams(a.calibration, a.bits, a.symmetric, a.percentile)
        layers[name] = QAT_METHODS[method](name, model.get_submodule(name), rule, act, dict(options, hessian=hess))
        set_module(model, name, layers[name])

    if QAT_METHODS[method].needs_hessian(options):
        # Hessians block by block through the layers already built, as PTQ's GPTQ takes them: PB-LLM QAT then starts
        # exactly at `edgeq quantize --recipe pb-llm`'s integers
        if not calib_batches:
            raise EdgeqError(f"qat: method {method!r} needs calibration data (its salient mask / PB-GPTQ start use Hessians)")
        from .calibration import calibrate_blockwise

        def finish(names, stats, _bar):
            for name in names:
                _, acc, obs = stats[name]
                build(name, obs, acc.result())

        with torch.no_grad():
            calibrate_blockwise(model, targets, recipe, list(calib_batches), finish, lambda name, rule: True)
    else:
        observers = _observe(model, [n for n, (_, r) in targets.items() if r.activation.mode == "static"], calib_batches, ActObserver)
        for name in targets:
            build(name, observers.get(name), None)
    shared = _share_activation_grids(model, layers, calib_batches)
    if shared:
        extra["qat_shared_activation_grids"] = shared
    if options.get("output_grids"):
        extra["qat_output_grids"] = _simulate_output_grids(model, layers, calib_batches, recipe.name)
    return PreparedQAT(bundle, recipe, method, layers, bytes_before, untied, folded, options, extra)


def _share_activation_grids(model, layers: dict[str, QATLayer], calib_batches) -> list[list[str]]:
    """Give layers that read the same tensor (q/k/v, gate/up) one learnable static activation grid.

    A TFLite file holds one grid per tensor and the exporters refuse two, so the layers' scales, equal
    at calibration, must stay equal through training: the first layer's parameter becomes all of theirs.
    Which layers share an input is seen in one short forward pass. Returns the groups tied.
    """
    static = {n: m for n, m in layers.items() if m.rule.activation.mode == "static"}
    if len(static) < 2:
        return []
    inputs: dict[str, torch.Tensor] = {}  # holding every input keeps its storage from being reused within the pass
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0])) for n, m in static.items()]
    try:
        with torch.no_grad():
            model(*(t[:1, :8] for t in calib_batches[0]))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in inputs:
        for group in groups:
            if inputs[group[0]] is inputs[name] and static[group[0]].rule.activation == static[name].rule.activation:
                group.append(name)
                break
        else:
            groups.append([name])
    tied = [g for g in groups if len(g) > 1]
    for first, *rest in tied:
        for name in rest:
            static[name].act_scale = static[first].act_scale
            static[name].act_zero_point = static[first].act_zero_point
    return tied


def _simulate_output_grids(model, layers: dict[str, QATLayer], calib_batches, recipe_name: str) -> dict:
    """Train through full-integer TFLite's requantization of each static layer's output (`edgeq qat --output-grids`).

    A full-integer file writes every integer layer's output on a per-tensor grid (int8 asymmetric; int16 symmetric in
    16x8 layers) that ai-edge-quantizer calibrates by min/max at export, a rounding the QDIR's simulation (and its
    ONNX rendering) does not have. Here each grid is the min/max of the start model's outputs over the calibration
    batches, held fixed through training; the QDIR keeps no output grids, the export calibrates its own on the
    trained model. Returns what quant.json records.
    """
    static = {n: m for n, m in layers.items() if m.rule.activation.mode == "static"}
    if not static:
        raise EdgeqError(f"qat: --output-grids simulates full-integer TFLite's output grids; recipe {recipe_name!r} has no "
                         "static activations (use w8a8-static-fc2a16 or w8a8-static)")
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(name, out):
        lo, hi = out.detach().amin(), out.detach().amax()
        old = ranges.get(name)
        ranges[name] = (lo, hi) if old is None else (torch.minimum(old[0], lo), torch.maximum(old[1], hi))

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: observe(n, out)) for n, m in static.items()]
    try:
        with torch.no_grad():
            for batch in calib_batches:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
    for name, layer in static.items():
        bits = layer.rule.activation.bits
        symmetric = bits == 16  # LiteRT's int16 activations are symmetric; int8 ones asymmetric (zero point - 128)
        layer.set_output_grid(*act_qparams(*ranges[name], bits, symmetric), bits, symmetric)
    return {"layers": len(static), "int16_layers": sum(m.rule.activation.bits == 16 for m in static.values()),
            "calibration": f"min/max of the start model's layer outputs over {len(calib_batches)} calibration batches, fixed"}


def _observe(model, names, batches, ActObserver) -> dict:
    """Activation observers at the inputs of `names`, from one float pass over `batches`."""
    if not names:
        return {}
    if not batches:
        raise EdgeqError("qat: this recipe needs calibration data (static activations)")
    from .observers import feed_observing_inputs

    out = {name: ActObserver() for name in names}
    feed_observing_inputs(model, {model.get_submodule(n): out[n].observe for n in names}, batches)
    return out


def convert_qat(prepared: PreparedQAT, extra: dict | None = None):
    """Replace every QAT layer by its `QuantLinear` (integers + learned scales): a `QuantizedModel`."""
    from .qmodel import QuantizedModel

    model = prepared.model
    for name, layer in prepared.layers.items():
        set_module(model, name, layer.to_quant_linear())
    model.eval()
    return QuantizedModel(prepared.bundle, prepared.recipe, prepared.bytes_before, prepared.untied, prepared.folded,
                          {**prepared.extra, **(extra or {})})
