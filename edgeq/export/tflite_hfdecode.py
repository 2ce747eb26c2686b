"""The generic decode step of a TFLite file: any Hugging Face decoder's own layers, attention over the caches by edgeq.

`HFDecode` has `tflite_decode.KVDecode`'s signature (see tflite_decode's docstring for the layout): the model's own
forward on one token, its attention modules calling `_cached_attention` (registered with transformers), which reads
the step's caches and mask and hands back the token's key and value. `tflite_decode.decode_module` picks it for
decoders outside the Llama family and for those whose sliding window is not longer than the cache.
"""

from __future__ import annotations

import torch

from ..errors import EdgeqError
from ..models.hf import MOVED_SCALING, returned_cache
from .tflite_decode import full_cache, to_signature_layout
from .tflite_runtime import attention_mask

_STEPS: list = []  # the decode step `HFDecode` is running (its caches, mask and the new keys and values), innermost last


def _cached_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """A Hugging Face attention module's attention over `HFDecode`'s caches (the mask Hugging Face made is not
    used): the one token's queries [1, heads, 1, d] grouped by kv head, scores over the token itself then the cached
    slots, scaled after the products (LiteRT's converter folds a constant MUL right after a FULLY_CONNECTED into the
    weight: a layer without rotary embedding would have its query weights rescaled), soft-capped as Gemma 2 does."""
    if kwargs.get("s_aux") is not None:
        raise EdgeqError(f"{type(module).__name__}: attention with sinks (s_aux) has no decode step in edgeq")
    step, i = _STEPS[-1], module.layer_idx
    scaling = getattr(module, MOVED_SCALING, scaling)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    _, heads, _, head_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    q = query.reshape(kv_heads, heads // kv_heads, head_dim)
    k, v = key.reshape(kv_heads, 1, head_dim), value.reshape(kv_heads, 1, value_dim)
    step["presents"][i] = (k, v)
    own = torch.bmm(q, k.transpose(1, 2)) * scaling
    cached = torch.bmm(q, step["cache"][2 * i].transpose(1, 2)) * scaling
    if softcap is not None:
        own, cached = torch.tanh(own / softcap) * softcap, torch.tanh(cached / softcap) * softcap
    window = kwargs.get("sliding_window")
    p = torch.softmax(torch.cat([own, cached + (window_mask(step, window) if window else step["mask"])], dim=-1), dim=-1)
    out = torch.bmm(p[..., 1:], step["cache"][2 * i + 1].transpose(1, 2)) + p[..., :1] * v
    return out.reshape(1, 1, heads, value_dim), None


def window_mask(step: dict, window: int) -> torch.Tensor:
    """The step's mask for a sliding-window layer: also float32's lowest for the slots the window has left (position
    p <= input_pos - window, as Hugging Face's `sliding_window_overlay`). A slot's index comes from the mask itself:
    counting its open slots (0) up to the slot gives index + 1 for every slot before input_pos, and no slot after
    it can have left the window. Nothing the size of the slots is constant (the converter folded the indices of
    `mask * 0 + 1` into one, and a SELECT's scalar into one of the mask's shape), so the slot count stays the
    runtime's choice. Computed once a step per window."""
    if window not in step["windows"]:
        mask, pos = step["mask"], step["pos"]
        slot = torch.cumsum((mask == 0).to(mask.dtype), dim=-1) - 1
        old = (slot <= (pos - window).to(mask.dtype)).to(mask.dtype)
        step["windows"][window] = mask + old * torch.finfo(mask.dtype).min
    return step["windows"][window]


class HFDecode(torch.nn.Module):
    """The decode step of a Hugging Face decoder outside the Llama family, with `KVDecode`'s signature: the model's
    own forward on the token at input_pos, its attention modules attending over the given caches
    (`_cached_attention`, registered with transformers as DECODE). Whatever else the family does (embedding scale,
    norms after attention and MLP, fused projections, layers without rotary embedding, multipliers, the logits' cap)
    is its own code. `unsupported_reason` runs it against the model's own cache on a probe first."""

    DECODE = "edgeq_decode"

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, input_pos, mask, *cache):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        from ..models.hf import attention_implementation

        AttentionInterface.register(self.DECODE, _cached_attention)
        AttentionMaskInterface.register(self.DECODE, eager_mask)
        step = {"cache": cache, "mask": mask, "pos": input_pos, "presents": {}, "windows": {}}
        _STEPS.append(step)
        try:
            with attention_implementation(self.model, self.DECODE):
                # a 4-D mask is taken as given: Hugging Face builds none (`_cached_attention` reads `mask` itself)
                logits = self.model(input_ids=input_ids, position_ids=input_pos.reshape(1, 1),
                                    attention_mask=mask.reshape(1, 1, 1, -1), use_cache=False).logits
        finally:
            _STEPS.pop()
        return (logits, *[t for i in range(len(cache) // 2) for t in step["presents"][i]])

    @staticmethod
    @torch.no_grad()
    def unsupported_reason(model: torch.nn.Module, window: int | None = None) -> str | None:
        """None if the step reproduces the model's own next-token logits after a prefill of a few tokens through its
        own cache (past `window` of them, if given: its sliding layers must then leave the oldest out), else why not
        (one line)."""
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            return f"{type(model).__name__} has no config.vocab_size"
        tokens = (window or 3) + 3
        slots = tokens + 2
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
        try:
            want = model(input_ids=ids).logits[0, -1]
            cache = to_signature_layout(returned_cache(full_cache(model, ids[:, :-1])), slots)
            got = HFDecode(model)(ids[:, -1:], torch.tensor([tokens - 1]), torch.from_numpy(attention_mask(tokens - 1, slots)),
                                  *cache)[0].reshape(-1)
        except Exception as exc:  # a layout the step cannot run
            return f"edgeq's decode step cannot run {type(model).__name__}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        diff = float((got - want).abs().max())
        if diff > 1e-3 * max(float(want.abs().max()), 1e-6):
            return f"edgeq's decode step does not reproduce {type(model).__name__}'s logits (max abs diff {diff:.2g})"
        return None
