"""Block-wise calibration: the statistics each quantized layer's method and activation grid need.

For transformer-like models (a ModuleList of repeated blocks) calibration runs one block at a time on the outputs of
the already-quantized blocks before it, so GPTQ's Hessians and static activation ranges see what the quantized model
will really feed each layer, and memory stays at one block's activations. SmoothQuant's channel maxima come from the
same pass as the block's statistics. Layers outside the blocks (a LM head, a CNN stem) are handled in a last pass over
the whole model, skipped when none of them takes statistics. Models without repeated blocks, blocks that do not chain
and recipes with `calibration.sequential = false` (every statistic from the float model, as `edgeq qat` starts) are
calibrated in one pass. Every pass ends once the layers it observes have had their inputs.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import EdgeqError
from ..models.hf import eager_attention
from ..recipe import Rule
from .methods import METHODS, LayerStats
from .observers import ActObserver, HessianAccumulator, StopForward, UntilSeen
from .transforms import smooth


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList of repeated blocks holding the most parameters, if any."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    return (best[0], best[1]) if best else None


def with_progress(items, progress, desc):
    return progress(items, desc) if progress else items


def add_absmax(out: dict, name: str, x: torch.Tensor) -> None:
    """out[name] = per-channel (last axis) max |x|, over every x so far (None before the first)."""
    m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
    out[name] = m if out[name] is None else torch.maximum(out[name], m)


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
                add_absmax(absmax, name, x)
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
            for i, block in enumerate(with_progress(list(block_list), progress, "blocks")):
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
