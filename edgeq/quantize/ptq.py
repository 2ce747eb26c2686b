"""Post-training quantization: apply a recipe to a model, block by block (the calibration: calibration.py).

The exact rewrites first (an untied head, folded norm gains and BatchNorms), then each layer's decision from its
rule and, where the method or the activation grid needs them, the statistics `calibrate_blockwise` collects.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from ..errors import EdgeqError
from ..models import ModelBundle
from ..recipe import ActSpec, QuantRecipe, Rule
from .methods import METHODS, LayerStats
from .modules import TIED_METHOD, LayerDecision, QuantConv2d, QuantLinear, set_module
from .calibration import add_absmax, calibrate_blockwise, calibration_blocks, no_cache, with_progress
from .observers import feed_observing_inputs
from .qmodel import QuantizedModel, model_float_bytes
from .transforms import fold_batchnorms, fold_norms, head_and_embedding, head_name, is_tied, smooth, smoothable, untie_head


def quantizable(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d) and module.padding_mode == "zeros":
        if type(module).forward is torch.nn.Conv2d.forward or hasattr(module, "static_padding"):
            return "conv2d"
    return None


def layer_kinds(module: torch.nn.Module, kind: str) -> tuple[str, ...]:
    """The kinds a recipe rule's `kind` may select a quantizable layer by: a depthwise conv (groups = input
    channels > 1) is both conv2d and depthwise."""
    if kind == "conv2d" and module.groups > 1 and module.groups == module.in_channels:
        return ("conv2d", "depthwise")
    return (kind,)


def plan(model: torch.nn.Module, recipe: QuantRecipe) -> dict[str, tuple[str, Rule]]:
    """name -> (kind, rule) for every layer the recipe quantizes."""
    out = {}
    for name, module in model.named_modules():
        kind = quantizable(module)
        rule = recipe.rule_for(name, layer_kinds(module, kind)) if kind else None
        if rule is not None:
            out[name] = (kind, rule)
    return out


def check_convolutions(model: torch.nn.Module, targets: dict[str, tuple[str, Rule]], recipe: QuantRecipe) -> None:
    """Refuse, before any calibration, a recipe that gives convolutions what only linear layers take: group-wise
    weights (no runtime has blockwise convolution kernels; the INT4 presets are for language models) and GPTQ on a
    grouped or depthwise conv (its rows are not one input's patches)."""
    convs = {n: rule for n, (kind, rule) in targets.items() if kind == "conv2d"}
    grouped = [n for n, rule in convs.items() if rule.weight.granularity == "group"]
    if grouped:
        raise EdgeqError(f"recipe {recipe.name!r}: {len(grouped)} convolution(s) ({grouped[0]} first) match a rule with "
                         "group-wise weights, which are for linear layers (no runtime has blockwise convolution kernels); "
                         "for a CNN use w8 or w8a8-static, or give convolutions a rule of their own before it "
                         "(kind = \"conv2d\", granularity = \"channel\")")
    gptq = [n for n, rule in convs.items() if METHODS[rule.method][1] and model.get_submodule(n).groups != 1]
    if gptq:
        raise EdgeqError(f"recipe {recipe.name!r}: {len(gptq)} grouped/depthwise convolution(s) ({gptq[0]} first) match a "
                         f"rule with method {convs[gptq[0]].method!r}, which they do not support; give them a rule of their "
                         "own before it (kind = \"depthwise\", with method = \"rtn\" or skip = true)")


def quantize_model(bundle: ModelBundle, recipe: QuantRecipe, calib_batches: Iterable | None = None,
                   progress=None) -> QuantizedModel:
    """Quantize `bundle.module` in place following `recipe`; `calib_batches` are model inputs (tuples)."""
    model = bundle.module.eval()
    bytes_before = model_float_bytes(model)
    head = head_name(model)
    untied = False
    if head and is_tied(model) and recipe.untie_head and recipe.rule_for(head) is not None:
        untied = untie_head(model)
    folded = fold_norms(model) if recipe.fold_norms else []
    example = tuple(bundle.example_inputs)
    folded_bn = fold_batchnorms(model, example) if recipe.fold_batchnorms and example else {}
    embedded = quantize_embedding(model, recipe.embedding, recipe.head_activation) if recipe.embedding is not None else []
    targets = plan(model, recipe)
    if not targets and not embedded:
        raise EdgeqError(f"recipe {recipe.name!r}: no rule matches any Linear/Conv2d layer of {bundle.reference!r}")
    check_convolutions(model, targets, recipe)
    needs_stats = any(METHODS[r.method][1] or r.activation.mode == "static" for _, r in targets.values())
    needs_data = recipe.smoothing > 0 or needs_stats
    batches = list(calib_batches) if calib_batches is not None else []
    if needs_data and not batches:
        raise EdgeqError(f"recipe {recipe.name!r} needs calibration data (GPTQ, static activations or smoothing): pass --calib")
    smoothed, smooth_in_blocks = {}, []
    if recipe.smoothing > 0:
        _, among = smoothing_targets(model, targets)
        blocks = calibration_blocks(model, batches, recipe.calibration.sequential)
        if needs_stats and blocks is not None and all(n.startswith(f"{blocks[0]}.") for n in among):
            smooth_in_blocks = among  # from the pass that takes the blocks' statistics
        else:
            smoothed = smooth_from_float(model, targets, recipe.smoothing, batches)
    hessian_kinds = {}
    with torch.no_grad():
        if needs_stats:  # (smoothing alone has used the data already)
            hessian_kinds, smoothed_in_blocks = _calibrated(model, targets, recipe, batches, progress, smooth_in_blocks)
            smoothed.update(smoothed_in_blocks)
        else:
            for name, (kind, rule) in with_progress(list(targets.items()), progress, "quantize"):
                _replace(model, name, kind, rule, LayerStats(), recipe)
    extra = {"smoothed_layers": len(smoothed), "smoothing_alpha": recipe.smoothing} if smoothed else {}
    idle = recipe.idle_rules([rule for _, rule in targets.values()])
    if idle:
        extra["rules_matching_no_layer"] = idle
    if hessian_kinds:
        # how many value projections got the attention-mixed Hessian ("attention") or fell back ("input")
        extra["gptq_value_hessians"] = {k: list(hessian_kinds.values()).count(k) for k in sorted(set(hessian_kinds.values()))}
    return QuantizedModel(bundle, recipe, bytes_before, untied, folded, extra, folded_bn)


@torch.no_grad()
def quantize_embedding(model: torch.nn.Module, spec, head_activation: ActSpec = ActSpec()) -> list[str]:
    """Replace the input embedding by a QuantEmbedding on `spec`'s grid (RTN over each row).

    A still-tied LM head (no rule of its own, so not untied) becomes a QuantLinear over the very
    same integers, its input on `head_activation`'s grid: the model keeps one table, as the float
    model did. Returns the names replaced.
    """
    from .methods import rtn
    from .modules import QuantEmbedding
    from .primitives import storage_dtype

    head, emb = head_and_embedding(model)
    if not isinstance(emb, torch.nn.Embedding):
        raise EdgeqError("recipe.embedding: this model has no torch.nn.Embedding input embedding to quantize")
    name = next(n for n, m in model.named_modules() if m is emb)
    tied = head is not None and is_tied(model)
    w = emb.weight.detach().float()
    rule = Rule(match=name, weight=spec)
    q, scale, zp = rtn(w, rule, LayerStats(), None)
    q = q.to(storage_dtype(spec.bits, spec.symmetric))
    decision = LayerDecision(name, "embedding", spec, ActSpec(), "rtn", 1.0, tuple(w.shape))
    new = QuantEmbedding(decision, q, scale, zp, emb.padding_idx)
    set_module(model, name, new)
    replaced = [name]
    if tied:
        hname = head_name(model)
        if head.bias is not None:
            raise EdgeqError(f"recipe.embedding: the tied head {hname} has a bias; untie it with a rule of its own")
        hdecision = LayerDecision(hname, "linear", spec, head_activation, TIED_METHOD, 1.0, tuple(w.shape))
        set_module(model, hname, QuantLinear(hdecision, new.qweight, new.scale, new.zero_point))
        replaced.append(hname)
    return replaced


def smoothing_targets(model, targets: dict) -> tuple[set[str], list[str]]:
    """(the planned layers with <= 8-bit activations, those of them SmoothQuant can smooth).

    16-bit grids hold the outliers; smoothing them would only move those into the int8 weights.
    """
    with_acts = {n for n, (_, r) in targets.items() if r.activation.quantized and r.activation.bits <= 8}
    return with_acts, smoothable(model, with_acts)


@torch.no_grad()
def smooth_from_float(model, targets: dict, alpha: float, batches) -> dict[str, torch.Tensor]:
    """SmoothQuant with the float model's per-channel input maxima over `batches`; each smoothed layer's s."""
    with_acts, among = smoothing_targets(model, targets)
    return smooth(model, _channel_absmax(model, among, batches), alpha, with_acts)


def _channel_absmax(model, names, batches) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| at each named layer over the calibration batches."""
    out = dict.fromkeys(names)
    feed_observing_inputs(model, {model.get_submodule(n): (lambda x, n=n: add_absmax(out, n, x)) for n in names}, batches,
                          **no_cache(model))
    return {n: m for n, m in out.items() if m is not None}


def _replace(model, name, kind, rule: Rule, stats: LayerStats, recipe) -> None:
    module = model.get_submodule(name)
    w = module.weight.detach().float()
    shape = tuple(w.shape)
    w2 = w.reshape(shape[0], -1)
    if rule.weight.granularity == "group" and kind == "conv2d":
        raise EdgeqError(f"layer {name}: group-wise weights are for linear layers; use granularity = 'channel' for convolutions")
    fn, _ = METHODS[rule.method]
    q, scale, zp = fn(w2, rule, stats, recipe)
    from .primitives import storage_dtype

    q = q.to(storage_dtype(rule.weight.bits, rule.weight.symmetric))
    act_scale = act_zp = None
    if rule.activation.mode == "static":
        a = rule.activation
        act_scale, act_zp = stats.observer.qparams(a.calibration, a.bits, a.symmetric, a.percentile)
    fitted = []
    if act_scale is not None and rule.activation.bits == 8 and 2 <= rule.weight.bits <= 8 and module.bias is not None:
        q, scale, fitted = fit_bias_grid(w2, q, scale, zp, module.bias.detach(), float(act_scale), rule.weight)
    activation = rule.activation
    if kind == "conv2d" and activation.mode == "dynamic" and activation.granularity != "tensor":
        # a convolution's input has no token axis: its dynamic grid is the whole tensor (recorded so)
        activation = dataclasses.replace(activation, granularity="tensor", group_size=None)
    decision = LayerDecision(name, kind, rule.weight, activation, rule.method, rule.gamma, shape)
    if kind == "linear":
        new = QuantLinear(decision, q, scale, zp, module.bias, act_scale, act_zp)
    else:
        new = QuantConv2d(decision, module, q, scale, zp, act_scale, act_zp)
    if fitted:
        new.bias_fit_channels = fitted  # quant.json's layer entry
    set_module(model, name, new)


INT32_MAX = 2**31 - 1


def fit_bias_grid(w2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bias: torch.Tensor,
                  act_scale: float, spec) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A layer with a static 8-bit input has its bias stored as int32 on the grid input scale x weight scale (ONNX's
    QLinearConv / QDQ, TFLite's full-integer kernels). A channel whose bias that grid cannot hold (weights near 0, as
    a BatchNorm with a gain near 0 folded into the conv leaves: the channel's output is its bias) gets the least
    scale at which it fits with room to spare, |b| / (input scale x 2^30), and its weights requantized on it (to ~0),
    as ONNX Runtime's quantize_static rescales such weights; a per-tensor scale is raised as a whole. Returns the
    integers, the scales and the channels changed. Deciding it here keeps the simulation and both files on the same
    integers; left to the exporters, ai-edge-quantizer clipped such a bias to ~0 and ONNX Runtime cast it to INT_MIN."""
    from .primitives import quantize, round_scale

    b = bias.abs().double().reshape(-1, 1)
    over = b >= INT32_MAX * act_scale * scale.abs().double()
    if not over.any():
        return q, scale, []
    need = (b / (act_scale * 2**30)).float()
    if scale.shape[0] == 1:
        need, over = need.max().reshape(1, 1), over.any().reshape(1, 1)
    new = round_scale(torch.where(over, need * torch.sign(scale), scale), spec.scale_dtype)
    rows = torch.arange(w2.shape[0]) if scale.shape[0] == 1 else over.flatten().nonzero().flatten()
    q = q.clone()
    q[rows] = quantize(w2[rows], new.expand(w2.shape[0], -1)[rows], zp.expand(w2.shape[0], -1)[rows], spec.bits,
                       spec.symmetric).to(q.dtype)
    return q, new, rows.tolist()


def _finish(model, names, targets, stats, recipe, progress) -> None:
    for name in with_progress(names, progress, "quantize"):
        kind, rule = targets[name]
        st, acc, obs = stats[name]
        st.hessian = acc.result() if acc is not None else None
        st.observer = obs
        _replace(model, name, kind, rule, st, recipe)


def _calibrated(model, targets, recipe, batches, progress, smooth_layers) -> tuple[dict, dict]:
    """Calibrate (and smooth `smooth_layers`) and quantize every target: see `calibrate_blockwise`."""
    return calibrate_blockwise(model, targets, recipe, batches,
                               lambda names, stats, bar: _finish(model, names, targets, stats, recipe, bar), progress=progress,
                               smooth_layers=smooth_layers, sequential=recipe.calibration.sequential)


