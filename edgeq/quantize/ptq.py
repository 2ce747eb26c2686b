"""Post-training quantization: apply a recipe to a model, block by block.

For transformer-like models (a ModuleList of repeated blocks) calibration runs one block at a
time on the outputs of the already-quantized blocks before it, so GPTQ's Hessians and static
activation ranges see what the quantized model will really feed each layer, and memory stays at
one block's activations. SmoothQuant's channel maxima come from the same pass as the block's
statistics. Layers outside the blocks (a LM head, a CNN stem) are handled in a last pass over the
whole model, skipped when none of them takes statistics. Models without repeated blocks, and recipes with
`calibration.sequential = false` (every statistic from the float model, as `edgeq qat` starts), are
calibrated in one pass. Every pass ends once the layers it observes have had their inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import torch

from ..errors import EdgeqError
from ..models import ModelBundle
from ..models.hf import eager_attention
from ..recipe import ActSpec, QuantRecipe, Rule
from .methods import METHODS, LayerStats
from .modules import TIED_METHOD, LayerDecision, QuantConv2d, QuantLinear, set_module
from .observers import ActObserver, HessianAccumulator, StopForward, UntilSeen, feed_observing_inputs
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


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList of repeated blocks holding the most parameters, if any."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    return (best[0], best[1]) if best else None


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
            for name, (kind, rule) in _progress(list(targets.items()), progress, "quantize"):
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
    feed_observing_inputs(model, {model.get_submodule(n): (lambda x, n=n: _add_absmax(out, n, x)) for n in names}, batches,
                          **no_cache(model))
    return {n: m for n, m in out.items() if m is not None}


def _add_absmax(out: dict, name: str, x: torch.Tensor) -> None:
    """out[name] = per-channel (last axis) max |x|, over every x so far (None before the first)."""
    m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
    out[name] = m if out[name] is None else torch.maximum(out[name], m)


def _progress(items, progress, desc):
    return progress(items, desc) if progress else items


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
    rows = over.flatten().nonzero().flatten()
    if scale.shape[0] == 1:
        rows = torch.arange(w2.shape[0])
    q = q.clone()
    q[rows] = quantize(w2[rows], new.expand(w2.shape[0], -1)[rows], zp.expand(w2.shape[0], -1)[rows], spec.bits,
                       spec.symmetric).to(q.dtype)
    return q, new, rows.tolist()


def _method_hessian(name: str, rule: Rule) -> bool:
    """Whether the rule's PTQ method takes the layer's input Hessian (GPTQ, PB-GPTQ)."""
    return METHODS[rule.method][1]


@contextlib.contextmanager
def _observing(model, names, targets, recipe, wants_hessian=_method_hessian, until: UntilSeen | None = None,
               absmax: dict | None = None):
    """Hooks collecting Hessians (where `wants_hessian(name, rule)`) / activation ranges at the inputs of `names`, and
    the per-channel max |x| of the layers keyed in `absmax` into it; every layer that collects something is a key of
    `until`, seen when its statistics have been added.

    A value projection's GPTQ Hessian (recipe.gptq.value_hessian = "attention", with the model
    running eager attention) is built from its inputs mixed by the attention weights, the rows
    the attention output is made of: an error in the value of a token most queries attend to (an
    attention sink) costs in proportion. Its plain input Hessian underweights such tokens (one per
    window on SmolLM2, where GPTQ's v_proj then lost to round-to-nearest).
    """
    stats = {}
    handles = []
    last: dict = {}  # the input most recently added to a Hessian, and that Hessian
    until = until if until is not None else UntilSeen()
    absmax = absmax if absmax is not None else {}
    for name in names:
        kind, rule = targets[name]
        module = model.get_submodule(name)
        st = LayerStats()
        acc = HessianAccumulator(_columns(module, kind)) if wants_hessian(name, rule) else None
        obs = ActObserver() if rule.activation.mode == "static" else None
        stats[name] = (st, acc, obs)
        maxes = name in absmax
        if acc is not None or obs is not None or maxes:
            until.keys.add(name)
        attention = _attention_of(model, name) if acc is not None and recipe.gptq.value_hessian == "attention" else None
        if attention is not None:  # (seen once the attention output has added the mixed rows)
            handles += _attention_weighted(module, attention, acc, st, lambda name=name: until.seen(name))
            acc = None
        seen_here = name in until.keys and attention is None

        def hook(mod, args, name=name, kind=kind, adds=acc is not None, obs=obs, maxes=maxes, seen_here=seen_here):
            x = args[0]
            if obs is not None:
                obs.observe(x)
            if adds:
                _add_shared(stats, name, kind, mod, x, last)
            if maxes:
                _add_absmax(absmax, name, x)
            if seen_here:
                until.seen(name)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _add_shared(stats, name, kind, module, x, last) -> None:
    """Add `x` to layer `name`'s Hessian; linear layers reading the very same input tensor (q/k/v,
    gate/up) share one Hessian, accumulated once."""
    st, acc, obs = stats[name]
    if kind == "linear" and x is last.get("x"):
        if acc is last["acc"]:
            return
        if acc.n == 0:
            stats[name] = (st, last["acc"], obs)
            return
    acc.add(_unfold(x, module) if kind == "conv2d" else x)
    last.update(x=x, acc=acc)


def _attention_of(model, name) -> torch.nn.Module | None:
    """The attention module whose value projection `name` is (Hugging Face layout `...attn.v_proj`)."""
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent) if child == "v_proj" and parent else None


def _attention_weighted(v_proj, attention, acc, st: LayerStats, added) -> list:
    """Hooks adding sum_j a_hij x_j (every head h, query i) to `acc`, raw inputs if no weights come out;
    `added()` after each addition."""
    pending = []

    def keep_input(mod, args):
        pending.append(args[0])

    def add_mixed(mod, args, out):
        x = pending.pop()
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if torch.is_tensor(weights) and weights.dim() == 4 and weights.shape[-1] == x.shape[-2]:
            acc.add(weights.to(x.dtype) @ x.unsqueeze(1))
            st.hessian_kind = "attention"
        else:
            acc.add(x)
            st.hessian_kind = "input"
        added()

    return [v_proj.register_forward_pre_hook(keep_input), attention.register_forward_hook(add_mixed)]


def _columns(module, kind) -> int:
    return module.weight[0].numel()


def _unfold(x, conv):
    """Conv input as the rows GPTQ sees: [N*L, in/groups*kh*kw] patches (only for groups == 1)."""
    if conv.groups != 1:
        raise EdgeqError("GPTQ on grouped/depthwise convolutions is not supported; use method = 'rtn' for them")
    if hasattr(conv, "static_padding"):
        x = conv.static_padding(x)
    cols = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2)


def _finish(model, names, targets, stats, recipe, progress) -> None:
    for name in _progress(names, progress, "quantize"):
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


def calibrate_blockwise(model, targets, recipe, batches, finish, needs_hessian=None, progress=None,
                        smooth_layers=(), sequential: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Collect each target's statistics and hand them to `finish(names, stats, progress)`, which replaces the layers,
    one transformer block at a time: a block's statistics come from the outputs of the blocks already replaced (the
    quantized model's activations, as GPTQ's sequential calibration does); layers outside the blocks come last.

    `stats[name]` is (LayerStats, HessianAccumulator or None, ActObserver or None). A layer gets a Hessian when
    `needs_hessian(name, rule)` (default: its PTQ method uses one). `smooth_layers` (layers inside the blocks) are
    smoothed with `recipe.smoothing` from the same pass: a block's channel maxima are taken with its statistics,
    the block is smoothed, and its statistics are carried over to the smoothed inputs x / s exactly (`_divide_inputs`),
    so SmoothQuant costs no pass of its own and sees what the quantized model feeds the block. Returns the kind of
    Hessian each value projection got and each smoothed layer's s.

    With `sequential` false every target's statistics come from one pass of the model as it is (the float model:
    `calibration.sequential = false`); `smooth_layers` must then be empty (smooth from the float model first).
    """
    wants = needs_hessian or _method_hessian
    weighted = recipe.gptq.value_hessian == "attention" and any(
        wants(n, rule) and _attention_of(model, n) is not None for n, (_, rule) in targets.items())
    hessian_kinds = {}
    smoothed: dict[str, torch.Tensor] = {}

    def done_with(names, stats, bar):
        finish(names, stats, bar)
        hessian_kinds.update({n: stats[n][0].hessian_kind for n in names if stats[n][0].hessian_kind is not None})

    if smooth_layers and not sequential:
        raise ValueError("calibrate_blockwise: smoothing inside the blocks needs the sequential pass")
    with eager_attention(model, weighted):
        blocks = calibration_blocks(model, batches, sequential)
        done: set[str] = set()
        if blocks is not None:
            prefix, block_list = blocks
            inputs = _capture_block_inputs(model, block_list[0], batches)
            for i, block in enumerate(_progress(list(block_list), progress, "blocks")):
                names = [n for n in targets if n.startswith(f"{prefix}.{i}.")]
                until = UntilSeen()
                absmax = dict.fromkeys(n for n in smooth_layers if n in names)
                with _observing(model, names, targets, recipe, wants, until, absmax) as stats:
                    until.run(lambda item: block(*item[0], **item[1]), inputs)
                if absmax:
                    scales = smooth(model, {n: a for n, a in absmax.items() if a is not None}, recipe.smoothing, set(absmax))
                    _divide_inputs(stats, scales)
                    smoothed.update(scales)
                done_with(names, stats, None)
                done.update(names)
                if i + 1 < len(block_list):  # the next block's inputs: this one's outputs, quantized
                    inputs = [_with_hidden(args, kwargs, _first(block(*args, **kwargs))) for args, kwargs in inputs]
        rest = [n for n in targets if n not in done]
        if rest:  # (a LM head quantized without data gets no pass)
            until = UntilSeen()
            with _observing(model, rest, targets, recipe, wants, until) as stats:
                until.run(lambda batch: model(*batch, **no_cache(model)), batches)
            done_with(rest, stats, progress if blocks is None else None)
    return hessian_kinds, smoothed


def _divide_inputs(stats: dict, scales: dict[str, torch.Tensor]) -> None:
    """Carry statistics taken on inputs x over to x / s (each layer's SmoothQuant s): activation ranges and samples per
    channel, Hessians as diag(1/s) H diag(1/s), each shared Hessian (q/k/v read one input) once."""
    hessians = {}
    for name, s in scales.items():
        _, acc, obs = stats[name]
        if obs is not None:
            obs.divide_channels(s)
        if acc is not None:
            hessians[id(acc)] = (acc, s)
    for acc, s in hessians.values():
        acc.divide_channels(s)


def no_cache(model) -> dict:
    """Forward kwargs turning off a Hugging Face model's KV cache (calibration re-runs blocks)."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def calibration_blocks(model, batches, sequential: bool = True) -> tuple[str, torch.nn.ModuleList] | None:
    """The blocks a sequential calibration goes through (`find_blocks`), or None (one pass of the whole model) when
    the recipe says `calibration.sequential = false` or the blocks do not chain: fed the first block's arguments with
    each block's output in place of its hidden state, every block must compute what it computes in the model (the
    first batch's first input, float). Swin's stages take their map's height and width (`input_dimensions`), which
    halve at each; chaining them fed stage 1 stage 0's and failed. EfficientNet-Lite's blocks differ only in a
    drop-connect rate that does nothing in eval mode: they chain."""
    blocks = find_blocks(model) if sequential else None
    if blocks is None or not batches:
        return blocks
    block_list = list(blocks[1])
    calls, outputs = {}, {}

    def output(i, out):
        outputs[i] = _first(out)
        if i == len(block_list) - 1:
            raise StopForward  # (what comes after the blocks, an LM head, need not run)

    hooks = []
    for i, block in enumerate(block_list):
        hooks.append(block.register_forward_pre_hook(lambda m, a, k, i=i: calls.setdefault(i, []).append((a, k)),
                                                     with_kwargs=True))
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: output(i, o)))
    sample = tuple(t[:1] if torch.is_tensor(t) else t for t in batches[0])  # one input is enough, and cheap
    try:
        with torch.no_grad():
            model(*sample, **no_cache(model))
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    if any(len(calls.get(i, [])) != 1 or not torch.is_tensor(outputs.get(i)) for i in range(len(block_list))):
        return None  # a block skipped or called twice
    args, kwargs = calls[0][0]
    with torch.no_grad():
        for i, block in enumerate(block_list):
            try:
                out = _first(block(*args, **kwargs))
            except Exception:  # (Swin: a view of the wrong map size)
                return None
            if not torch.is_tensor(out) or out.shape != outputs[i].shape or not torch.allclose(out, outputs[i], rtol=1e-4, atol=1e-6):
                return None
            args, kwargs = _with_hidden(args, kwargs, out)
    return blocks


def _with_hidden(args, kwargs, hidden):
    """The next block's inputs: this block's output in place of its hidden-state input."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture_block_inputs(model, first_block, batches) -> list:
    captured = []

    def hook(mod, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(*batch, **no_cache(model))
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise EdgeqError("calibration: the model's first block was not reached by every calibration batch")
    return captured
