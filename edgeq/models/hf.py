"""Local Hugging Face model directories (never a hub download)."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import EdgeqError
from . import ModelBundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# torchao (pulled in by litert-torch) logs about CUDA kernels it cannot load on a CPU machine, and
# torch warns about its enums; neither concerns edgeq's users.
for _name in ("torchao", "torch.utils._pytree", "torch.onnx._internal.exporter._registration"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def with_cache(model: torch.nn.Module, cache, **inputs):
    """`model(**inputs, use_cache=True)` starting from `cache` (None: the model makes its own), by the keyword its
    forward takes: `cache` in recent transformers (5.25 warns that `past_key_values` goes in 5.40), `past_key_values`
    in older ones."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(**inputs, **({} if cache is None else {keyword: cache}), use_cache=True)


def returned_cache(out):
    """The cache a Hugging Face forward returned: its `cache` field in recent transformers, `past_key_values` in older
    ones (where recent ones keep that name, it warns)."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str | None):
    """A Hugging Face model runs attention implementation `name` while in the block, and its own after; no change with
    `name` None or for models without one."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if name is None or before in (None, name) or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def eager_attention(model: torch.nn.Module, enable: bool):
    """A Hugging Face model runs its eager attention instead of sdpa while `enable` (other models: no change).

    GPTQ's attention-weighted value Hessians need the attention weights, which only eager attention returns;
    TFLite conversion of encoders needs the scores scaled after the matmul, because litert-torch lowers sdpa by
    scaling queries and keys by sqrt(scale) each, constants the converter folds into the query and key weights.
    """
    return attention_implementation(model, "eager" if enable else None)


GROUPED = "edgeq_grouped"  # the attention implementation `grouped_attention` registers with transformers
MOVED_SCALING = "_edgeq_scaling"  # an attention module's own query scaling while `litert_attention` moves it


def _grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Hugging Face's eager attention for grouped-query models without repeating the keys and values: the query heads
    that share kv head j (heads j * groups .. j * groups + groups - 1, as `repeat_kv` orders them) are stacked along the
    sequence axis, so both products are one batched matmul per kv head. The same sums as eager attention, term by term,
    with Gemma 2's soft-capping of the scores (`softcap`); attention sinks (`s_aux`: gpt-oss) are refused."""
    if kwargs.get("s_aux") is not None:
        raise EdgeqError(f"{type(module).__name__}: attention with sinks (s_aux) is not rendered by edgeq's attention")
    scaling = getattr(module, MOVED_SCALING, scaling)
    batch, heads, length, head_dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * length, head_dim), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = (scores.view(batch, kv_heads, groups, length, slots) + attention_mask[:, :, None, :, :slots]).view(scores.shape)
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(batch, heads, length, head_dim)
    return out.transpose(1, 2).contiguous(), None


def grouped_attention(model: torch.nn.Module, every: bool = False):
    """A Hugging Face grouped-query model (fewer key/value heads than query heads; with `every`, any Hugging Face
    model) runs `_grouped_attention` while in the block; other models: no change. For graph export: eager and sdpa
    attention repeat each key and value head for its query heads (`repeat_kv`), which litert-torch renders as
    BROADCAST_TOs that XNNPACK has no kernel for."""
    if not (every or _grouped_query(model)):
        return attention_implementation(model, None)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, _grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)
    return attention_implementation(model, GROUPED)


def query_scaling(module: torch.nn.Module, default: float) -> float:
    """An attention module's own query scaling, also while `litert_attention` has moved it (`default`: it has none)."""
    return float(getattr(module, MOVED_SCALING, getattr(module, "scaling", default)))


@contextlib.contextmanager
def litert_attention(model: torch.nn.Module):
    """The attention TFLite exports convert a Hugging Face decoder LM with: `_grouped_attention` whatever its head
    counts, with each attention module's own query scaling (its `scaling`) applied to the scores instead.

    LiteRT's converter folds a constant MUL after a FULLY_CONNECTED into the layer's weight: OPT-style modules
    (`q_proj(x) * self.scaling`, then attention with scaling 1) would get their query weights rescaled, and sdpa's
    lowering scales queries and keys by sqrt(scale) each, which without a rotary embedding in between ends in both
    weights the same way. Scores scaled after the product leave every weight as quantized. Llama-style modules pass
    their `scaling` to the attention function, which then reads the same value from the module: no change there."""
    moved = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), float) and hasattr(m, "q_proj")]
    for m in moved:
        setattr(m, MOVED_SCALING, m.scaling)
        m.scaling = 1.0
    try:
        with grouped_attention(model, every=True):
            yield
    finally:
        for m in moved:
            m.scaling = getattr(m, MOVED_SCALING)
            delattr(m, MOVED_SCALING)


def decoder_attention(model: torch.nn.Module):
    """The attention ONNX exports trace a Hugging Face decoder LM with: `grouped_attention` for a grouped-query model,
    eager attention for the others. Both leave out what sdpa's rendering adds to every layer: its safe softmax's
    `Where(IsNaN(p), 0, p)` over the probabilities, and (grouped-query models) each key and value head repeated."""
    return grouped_attention(model) if _grouped_query(model) else eager_attention(model, True)


def _grouped_query(model: torch.nn.Module) -> bool:
    """A Hugging Face model with fewer key/value heads than query heads."""
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return bool(heads and kv_heads and heads != kv_heads)


@torch.no_grad()
def fold_multipliers(model: torch.nn.Module) -> list[str]:
    """Fold Granite-style output multipliers into the weights before them, exactly, and make them 1: each layer's
    `residual_multiplier` (scaling the attention's and the MLP's output before the residual add) into o_proj's and
    down_proj's weights, and the config's `logits_scaling` (the logits' divisor) into the final norm's gain. LiteRT's
    converter folds a constant MUL after a FULLY_CONNECTED into its weight, which would change the integers edgeq
    chose. Checked on a probe input: a model whose logits the fold changes is put back as it was. Returns what was
    folded."""
    from ..quantize.transforms import gain_offset, probe_logits, same_logits

    inner, config = getattr(model, "model", None), getattr(model, "config", None)
    moves = []  # (owner of the multiplier, attribute, [(module, factor)])
    for layer in getattr(inner, "layers", None) or []:
        r = getattr(layer, "residual_multiplier", None)
        outs = [getattr(getattr(layer, a, None), p, None) for a, p in (("self_attn", "o_proj"), ("mlp", "down_proj"))]
        if isinstance(r, float) and r != 1.0 and all(isinstance(m, torch.nn.Linear) for m in outs):
            moves.append((layer, "residual_multiplier", [(m, r) for m in outs]))
    s, norm = getattr(config, "logits_scaling", None), getattr(inner, "norm", None)
    if isinstance(s, float) and s != 1.0 and norm is not None and gain_offset(norm) == 0.0:
        moves.append((config, "logits_scaling", [(norm, 1.0 / s)]))
    if not moves:
        return []
    ref = probe_logits(model)
    values = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in moves]
    tensors = [(m, m.weight.clone(), None if getattr(m, "bias", None) is None else m.bias.clone())
               for _, _, scaled in moves for m, _ in scaled]
    for owner, attr, scaled in moves:
        for m, factor in scaled:
            m.weight.mul_(factor)
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(factor)
        setattr(owner, attr, 1.0)
    if same_logits(probe_logits(model), ref):
        if any(attr == "residual_multiplier" for _, attr, _ in moves):
            config.residual_multiplier = 1.0
        return sorted({attr for _, attr, _ in moves})
    for owner, attr, value in values:  # not the layout assumed: as it was
        setattr(owner, attr, value)
    for m, w, b in tensors:
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return []


@torch.no_grad()
def conv1d_as_linear(model: torch.nn.Module) -> list[str]:
    """Replace transformers' Conv1D layers (GPT-2's projections: x @ W + b with W [in, out]) by the equal
    torch.nn.Linear (weight W^T), so that they are quantized and exported like any linear layer; returns their names."""
    from transformers.pytorch_utils import Conv1D

    from ..quantize.modules import set_module

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None)
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        set_module(model, name, linear)
    return names


def load_hf_dir(path: Path, reference: str, **kwargs) -> ModelBundle:
    import transformers

    config_file = path / "config.json"
    if not config_file.is_file():
        raise EdgeqError(f"model: directory {str(path)!r} has no config.json (not a Hugging Face model)")
    try:
        archs = json.loads(config_file.read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"model: {config_file} is not valid JSON ({exc})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = any(a.endswith("ForCausalLM") or a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in archs)  # GPT2LMHeadModel
    if not causal and any(a.endswith("ForImageClassification") for a in archs):
        return _image_classifier(path, reference, **kwargs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, local_files_only=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:
        raise EdgeqError(f"model: cannot load Hugging Face directory {str(path)!r}: {type(exc).__name__}: {exc}") from None
    conv1d_as_linear(model)
    model.eval()
    if causal:
        fold_multipliers(model)
    kind = "causal-lm" if causal else "encoder"
    ids = torch.tensor([tokenizer("edgeq quantizes models for edge boards.")["input_ids"]])
    example = (ids,) if causal else (ids, torch.ones_like(ids))
    return ModelBundle(model, kind, reference, tokenizer=tokenizer, example_inputs=example)


def _image_classifier(path: Path, reference: str, **kwargs) -> ModelBundle:
    """A Hugging Face image classifier (ResNet, MobileNet, EfficientNet, ConvNeXt, ViT, ...): an image model whose
    inputs are made as its preprocessor_config.json says (the crop size, the mean and std per channel), its example
    input one such image; without that file, the config's `image_size` (224 if none) and mean = std = 0.5."""
    import transformers

    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32,
                                                                             local_files_only=True, **kwargs)
    except Exception as exc:
        raise EdgeqError(f"model: cannot load Hugging Face directory {str(path)!r}: {type(exc).__name__}: {exc}") from None
    model.eval()
    fold_layer_scales(model)
    prep = {}
    if (path / "preprocessor_config.json").is_file():
        try:
            prep = json.loads((path / "preprocessor_config.json").read_text())
        except json.JSONDecodeError as exc:
            raise EdgeqError(f"model: {path / 'preprocessor_config.json'} is not valid JSON ({exc})") from None
    size = _image_size(prep.get("crop_size") or prep.get("size")) or getattr(model.config, "image_size", None) or 224
    size = size if isinstance(size, int) else size[0] if isinstance(size, (list, tuple)) else 224
    channels = getattr(model.config, "num_channels", 3)
    mean, std = prep.get("image_mean", 0.5), prep.get("image_std", 0.5)
    return ModelBundle(model, "image", reference, example_inputs=(torch.zeros(1, channels, size, size),),
                       info={"image_size": size, "mean": mean, "std": std})


def _image_size(size) -> int | None:
    """The square side a preprocessor's `crop_size` / `size` gives: an int, {"height", "width"} (equal) or
    {"shortest_edge"}; None for anything else."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if size.get("height") and size.get("height") == size.get("width"):
            return int(size["height"])
        if isinstance(size.get("shortest_edge"), int):
            return size["shortest_edge"]
    return None


@torch.no_grad()
def fold_layer_scales(model: torch.nn.Module) -> list[str]:
    """Fold ConvNeXt's layer scale (`layer_scale_parameter * pwconv2(x)`, one factor per channel) into pwconv2's
    weight rows and bias, exactly, and make it 1, as `fold_multipliers` does for Granite: LiteRT's converter folds a
    constant MUL after a FULLY_CONNECTED into its weight, which would change the integers edgeq chose. Returns the
    blocks folded."""
    folded = []
    for name, block in model.named_modules():
        gamma, linear = getattr(block, "layer_scale_parameter", None), getattr(block, "pwconv2", None)
        if not isinstance(gamma, torch.Tensor) or not isinstance(linear, torch.nn.Linear) or gamma.shape != (linear.out_features,):
            continue
        linear.weight.mul_(gamma[:, None])
        if linear.bias is not None:
            linear.bias.mul_(gamma)
        gamma.fill_(1.0)
        folded.append(name)
    return folded
