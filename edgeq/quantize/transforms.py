"""Exact graph rewrites done before quantization decisions: untie the LM head, fold norm scales and BatchNorms.

Folding RMSNorm/LayerNorm gains into the linears that follow is exact (a diagonal scale commutes
into the weight's columns) and must happen before quantization: the LiteRT converter folds them
anyway, and integers chosen before folding would no longer be the ones in the file.
A norm is folded only when its output feeds nothing but linear layers (pre-norm blocks): measured on a probe
input (`llama_norm_groups`, `fold_norms`), not read from names. A BatchNorm2d after a conv folds into the conv's
weight rows and bias (`fold_batchnorms`; a BatchNorm1d after a linear layer too), for the same reason.
"""

from __future__ import annotations

import torch

from .modules import set_module


def head_and_embedding(model: torch.nn.Module):
    """The LM head and the input embedding of a Hugging Face model (None where it has none: transformers raises
    NotImplementedError for an image classifier's input embeddings)."""
    return _called(model, "get_output_embeddings"), _called(model, "get_input_embeddings")


def _called(model: torch.nn.Module, getter: str):
    get = getattr(model, getter, None)
    try:
        return get() if get else None
    except NotImplementedError:
        return None


def head_name(model: torch.nn.Module) -> str | None:
    head, _ = head_and_embedding(model)
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def is_tied(model: torch.nn.Module) -> bool:
    head, emb = head_and_embedding(model)
    return head is not None and emb is not None and head.weight is emb.weight


def untie_head(model: torch.nn.Module) -> bool:
    """Give the LM head its own weight tensor; returns whether anything changed."""
    if not is_tied(model):
        return False
    head, _ = head_and_embedding(model)
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def llama_norm_groups(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(norm, [linears it feeds]) for pre-norm decoders (`model.model.layers`); empty for other models.

    Which norm feeds which linears is measured, not read from names: the model runs on a probe input and a
    linear belongs to a norm when its input is the norm's output tensor. Names mislead across families: Gemma 2 /
    3's `post_attention_layernorm` normalizes the attention's output before the residual add (its MLP reads
    `pre_feedforward_layernorm`), OLMo 2 has post-norms only, Phi-3 feeds one fused `qkv_proj` and `gate_up_proj`.
    The final norm feeds the head through a slice of its output (a view of the same memory)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int):
        return []
    names = {m: n for n, m in model.named_modules()}
    norms = [m for m in model.modules() if type(m).__name__.endswith("Norm") and isinstance(getattr(m, "weight", None), torch.Tensor)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    outputs, inputs = {}, {}

    def seen(store, key, value) -> None:  # a hook returning a value would replace the module's output
        store.setdefault(key, value)

    hooks = [m.register_forward_hook(lambda m, i, o: seen(outputs, m, o)) for m in norms]
    hooks += [m.register_forward_hook(lambda m, i, o: seen(inputs, m, i[0])) for m in linears]
    try:
        model(input_ids=_probe_ids(model))
    finally:
        for h in hooks:
            h.remove()
    groups = {}
    for lin in linears:
        x = inputs.get(lin)
        norm = next((n for n, y in outputs.items() if x is not None and _same_tensor(x, y)), None)
        if norm is not None:
            groups.setdefault(names[norm], []).append(names[lin])
    if is_tied(model):  # the head is the embedding: its columns are not the head's alone to scale
        groups = {n: ls for n, ls in groups.items() if head_name(model) not in ls}
    return list(groups.items())


def _probe_ids(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))


def _same_tensor(a, b) -> bool:
    """`a` is `b`, or a view of all of it (same memory, shape and strides)."""
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


@torch.no_grad()
def gain_offset(norm: torch.nn.Module) -> float | None:
    """How an RMSNorm applies its gain w, measured on a probe input (not read from its class): 0.0 for
    x * rsqrt(mean(x^2) + eps) * w (Llama), 1.0 for ... * (1 + w) (Gemma), None for anything else."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.dtype)
    got = norm(x).float()
    unit = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if torch.allclose(got, unit * (w.float() + offset), rtol=1e-4, atol=1e-5):
            return offset
    return None


@torch.no_grad()
def fold_norms(model: torch.nn.Module) -> list[str]:
    """Fold each pre-norm's gain into the linears it feeds and make the gain 1 (the weight 1 - `gain_offset`);
    returns folded norms. A norm whose form `gain_offset` does not know is left alone, and so is one whose fold
    changes the model's logits on the probe input (its output feeds something besides those linears too)."""
    groups = [(n, ls, offset) for n, ls in llama_norm_groups(model)
              if (offset := gain_offset(model.get_submodule(n))) is not None]
    if not groups:
        return []
    ref = probe_logits(model)
    saved = {n: model.get_submodule(n).weight.clone() for g in groups for n in [g[0], *g[1]]}
    for group in groups:
        _fold(model, *group)
    if same_logits(probe_logits(model), ref):
        return [n for n, _, _ in groups]
    folded = []  # some norm feeds more than its linears: fold them one at a time, keeping the folds that are exact
    for n, w in saved.items():
        model.get_submodule(n).weight.copy_(w)
    for norm_name, linear_names, offset in groups:
        _fold(model, norm_name, linear_names, offset)
        if same_logits(probe_logits(model), ref):
            folded.append(norm_name)
        else:
            for n in [norm_name, *linear_names]:
                model.get_submodule(n).weight.copy_(saved[n])
    return folded


def _fold(model: torch.nn.Module, norm_name: str, linear_names: list[str], offset: float) -> None:
    norm = model.get_submodule(norm_name)
    gain = norm.weight + offset
    for name in linear_names:
        lin = model.get_submodule(name)
        lin.weight.mul_(gain.to(lin.weight.dtype)[None, :])
    norm.weight.fill_(1.0 - offset)


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    out = model(input_ids=_probe_ids(model))
    return (out.logits if hasattr(out, "logits") else out[0]).double()


def same_logits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same logits up to the rounding a fold changes (a wrong fold moves them by a sizeable fraction)."""
    return float((a - b).abs().max()) <= 1e-3 * max(float(b.abs().max()), 1e-6)


def llama_smooth_groups(model: torch.nn.Module) -> list[tuple[str, str, list[str]]]:
    """(kind, producer, [consumers]) pairs where a per-channel scale moves exactly between them.

    `norm`: the pre-norm's gain divides, the q/k/v or gate/up columns multiply.
    `rows`: up_proj's output rows divide (down_proj's input is act(gate) * up, elementwise: gated MLPs, those with a
    gate_proj; Nemotron's act(up) has none), down_proj's columns multiply.
    """
    head = head_name(model)
    groups = [("norm", norm, linears) for norm, linears in llama_norm_groups(model) if head not in linears]
    inner = getattr(model, "model", None)
    for i, layer in enumerate(getattr(inner, "layers", []) or []):
        if all(hasattr(getattr(layer, "mlp", None), p) for p in ("gate_proj", "up_proj", "down_proj")):
            base = f"model.layers.{i}.mlp"
            groups.append(("rows", f"{base}.up_proj", [f"{base}.down_proj"]))
    return groups


def smoothable(model: torch.nn.Module, targets: set[str]) -> list[str]:
    """The layers of `targets` SmoothQuant can smooth: every consumer of a smoothing group within `targets`."""
    return [c for _, _, consumers in llama_smooth_groups(model) if set(consumers) <= targets for c in consumers]


@torch.no_grad()
def smooth(model: torch.nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float,
           targets: set[str]) -> dict[str, torch.Tensor]:
    """SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly.

    For each group whose consumers are all quantized with activations, s_j =
    max|X_j|^alpha / max|W_:,j|^(1 - alpha); the producer divides channel j by s_j and the
    consumers' column j is multiplied by it, so the float function is unchanged while the
    consumers' inputs lose their outlier channels. Returns each smoothed consumer's s (its input is now x / s).
    """
    smoothed = {}
    for kind, producer, consumers in llama_smooth_groups(model):
        if not all(c in targets and c in act_absmax for c in consumers):
            continue
        offset = gain_offset(model.get_submodule(producer)) if kind == "norm" else 0.0
        if offset is None:
            continue
        x_max = act_absmax[consumers[0]].float().clamp_min(1e-5)
        w_max = torch.stack([model.get_submodule(c).weight.abs().amax(dim=0) for c in consumers]).amax(dim=0).clamp_min(1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)
        prod = model.get_submodule(producer)
        if kind == "norm":  # the gain (weight + offset) divides
            prod.weight.copy_((prod.weight + offset) / s.to(prod.weight.dtype) - offset)
        else:
            prod.weight.div_(s[:, None].to(prod.weight.dtype))
            if prod.bias is not None:
                prod.bias.div_(s)
        for c in consumers:
            lin = model.get_submodule(c)
            lin.weight.mul_(s[None, :].to(lin.weight.dtype))
        smoothed.update(dict.fromkeys(consumers, s))
    return smoothed


def batchnorm_affine(bn: torch.nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor, shift) of an eval-mode BatchNorm, which computes x * factor + shift per channel (fp32)."""
    factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * factor
    return factor.detach().float(), shift.detach().float()


@torch.no_grad()
def batchnorm_pairs(model: torch.nn.Module, layers: dict[str, torch.nn.Module], example: tuple) -> dict[str, str]:
    """layer name -> the eval-mode BatchNorm called on that layer's output, found by running `example` once: a
    BatchNorm2d on a conv's output tensor, a BatchNorm1d on a linear layer's output flattened to [rows, features]
    (LeViT's `MLPLayerWithBN`: `batch_norm(linear(x).flatten(0, 1))`, a view of the same memory)."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))
             and not m.training and m.running_var is not None}
    if not norms or not layers:
        return {}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}

    def pre(norm_name, norm, x):
        if isinstance(norm, torch.nn.BatchNorm2d):
            hit = produced.get(id(x))
            if hit is not None and hit[1] is x:
                pairs[hit[0]] = norm_name
        elif x.dim() == 2 and x.shape[1] == norm.num_features:
            for name, out in produced.values():
                if (isinstance(layers[name], torch.nn.Linear) and out.data_ptr() == x.data_ptr()
                        and out.numel() == x.numel() and out.shape[-1] == x.shape[1]):
                    pairs[name] = norm_name

    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: produced.__setitem__(id(o), (n, o))) for n, m in layers.items()]
    hooks += [m.register_forward_pre_hook(lambda mod, a, n=n: pre(n, mod, a[0])) for n, m in norms.items()]
    try:
        model(*example)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def probe_like(example: tuple) -> tuple:
    """`example` with each float tensor replaced by seeded N(0, 1) values of its shape (an all-zero image hides what
    a conv's weights do); integer inputs (token ids, masks) kept."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(t.shape, generator=gen).to(t.dtype) if torch.is_tensor(t) and t.is_floating_point() else t
                 for t in example)


def _outputs(model: torch.nn.Module, example: tuple) -> list[torch.Tensor]:
    return [t.double() for t in torch.utils._pytree.tree_leaves(model(*example)) if torch.is_tensor(t)]


@torch.no_grad()
def fold_batchnorms(model: torch.nn.Module, example: tuple, pairs: dict[str, str] | None = None) -> dict[str, str]:
    """Fold each eval-mode BatchNorm called on a Conv2d's or Linear's output (`batchnorm_pairs`) into that layer and
    make the norm an identity: the layer's weight rows are multiplied by the norm's factor, its bias becomes
    bias * factor + shift. Returns layer -> norm folded.

    This happens before quantization decisions, as norm gains are folded into linears (`fold_norms`): TFLite has no
    separate BatchNorm and ONNX Runtime fuses a QDQ Conv only without one after it, so the files hold the folded
    weights, and the integers and scales edgeq decides on them are then the files' own. A norm is folded only where
    the model computes the same (probe input, `same_logits`' tolerance): one whose layer's output a skip connection
    also reads, or one called on other tensors too, stays. With `pairs` (a quantized-model directory's record) those
    folds are made again without checking."""
    if pairs is None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        pairs = batchnorm_pairs(model, layers, example)
        if not pairs:
            return {}
        probe = probe_like(example)
        ref = _outputs(model, probe)

        def holds() -> bool:
            return all(a.shape == b.shape and same_logits(a, b) for a, b in zip(_outputs(model, probe), ref))

        undo = _fold_batchnorms(model, pairs)
        if holds():
            return dict(pairs)
        undo()
        folded = {}
        for layer, norm in pairs.items():  # some fold changes the model: keep the ones that do not, one at a time
            undo = _fold_batchnorms(model, {layer: norm})
            if holds():
                folded[layer] = norm
            else:
                undo()
        return folded
    _fold_batchnorms(model, pairs)
    return dict(pairs)


def _fold_batchnorms(model: torch.nn.Module, pairs: dict[str, str]):
    """Fold `pairs` (layer -> norm) in place; returns a function that undoes it."""
    saved = []
    for layer_name, norm_name in pairs.items():
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        factor, shift = batchnorm_affine(norm)
        saved.append((layer, layer.weight.detach().clone(), layer.bias, norm_name, norm))
        layer.weight.mul_(factor.to(layer.weight.dtype).reshape(-1, *[1] * (layer.weight.dim() - 1)))
        bias = shift if layer.bias is None else layer.bias.detach().float() * factor + shift
        layer.bias = torch.nn.Parameter(bias.to(layer.weight.dtype), requires_grad=False)
        set_module(model, norm_name, torch.nn.Identity())

    def undo():
        for layer, weight, bias, norm_name, norm in reversed(saved):
            layer.weight.copy_(weight)
            layer.bias = bias
            set_module(model, norm_name, norm)

    return undo
