"""Exact graph rewrites done before quantization decisions: untie the LM head, fold norm scales.

Folding RMSNorm/LayerNorm gains into the linears that follow is exact (a diagonal scale commutes
into the weight's columns) and must happen before quantization: the LiteRT converter folds them
anyway, and integers chosen before folding would no longer be the ones in the file.
A norm is folded only when its output feeds nothing but linear layers (pre-norm blocks).
"""

from __future__ import annotations

import torch


def head_and_embedding(model: torch.nn.Module):
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    head = get_out() if get_out else None
    emb = get_in() if get_in else None
    return head, emb


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


def llama_norm_groups(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(norm, [linears it feeds]) for Llama-family pre-norm decoders; empty for other models."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return []
    groups = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")) or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj")):
            return []
        if not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm"):
            return []
        base = f"model.layers.{i}"
        groups.append((f"{base}.input_layernorm", [f"{base}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]))
        groups.append((f"{base}.post_attention_layernorm", [f"{base}.mlp.{p}" for p in ("gate_proj", "up_proj")]))
    if hasattr(inner, "norm") and not is_tied(model) and head_name(model):
        groups.append(("model.norm", [head_name(model)]))
    return groups


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
    returns folded norms. A norm whose form `gain_offset` does not know is left alone."""
    folded = []
    for norm_name, linear_names in llama_norm_groups(model):
        norm = model.get_submodule(norm_name)
        offset = gain_offset(norm)
        if offset is None:
            continue
        gain = norm.weight + offset
        for name in linear_names:
            lin = model.get_submodule(name)
            lin.weight.mul_(gain.to(lin.weight.dtype)[None, :])
        norm.weight.fill_(1.0 - offset)
        folded.append(norm_name)
    return folded


def llama_smooth_groups(model: torch.nn.Module) -> list[tuple[str, str, list[str]]]:
    """(kind, producer, [consumers]) pairs where a per-channel scale moves exactly between them.

    `norm`: the pre-norm's gain divides, the q/k/v or gate/up columns multiply.
    `rows`: up_proj's output rows divide (down_proj's input is act(gate) * up, elementwise),
    down_proj's columns multiply.
    """
    groups = []
    for norm, linears in llama_norm_groups(model):
        if norm != "model.norm":
            groups.append(("norm", norm, linears))
    inner = getattr(model, "model", None)
    for i, _ in enumerate(getattr(inner, "layers", []) or []):
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
