"""The KV-cache decode-step signature of a decoder LM's TFLite file.

TFLite graphs are static, so the cache is too: `decode(input_ids [1, 1], input_pos [1], k_0, v_0, ...)
-> (logits [1, 1, vocab], k_new_0, v_new_0, ...)` with every key cache shaped [kv_heads, cache_len,
head_dim], every value cache stored transposed, [kv_heads, head_dim, cache_len], and every new key and
value [kv_heads, 1, head_dim]. The step attends over cache slots 0..input_pos-1 (the rest masked) and
over its own token's key and value, which it returns; the caller writes them into slot `input_pos`
(`tflite_runtime.write_row`: by `run_steps`, or in place in the interpreter's input buffers by
`tflite_runtime.DecodeSession`). The graph only reads the caches: it neither copies them nor returns
them, so a step moves a token's worth of data in and out, not two copies of the cache (SmolLM2 at 256
slots: 11.8 MB each way, which cost more than the INT4 step's own compute through the Python signature
runner). The layout is the one both attention products read without moving the cache: scores =
q . K^T and out = p . (V^T)^T are BATCH_MATMULs with a transposed right-hand side (adj_y) over 3-D
operands, where Hugging Face's [1, kv_heads, cache_len, head_dim] for both cost LiteRT a TRANSPOSE and
reshape copies of each cache every step. Keys are stored after rotary embedding, as in Hugging Face's
cache: a layer's Hugging Face keys `k` and values `v` ([1, kv_heads, n, head_dim]) are this signature's
`k[0]` and `v[0].transpose(1, 2)`, zero-padded to cache_len slots (`to_signature_layout`).

The file's prefill signature returns the caches too (`KVPrefill`), in the same layout, so a generation
loop runs the prompt in one call and then decodes. The step is written over the Hugging Face module's
own layers (projections, norms, MLP, rotary embedding), so the float rendering of a quantized model
(its dequantized weights) and the cached labelled graph work unchanged, and both signatures of the file
read one copy of each weight. Llama-family layouts only (model types llama (SmolLM2 too), mistral,
qwen2: q/k/v/o projections, pre-norms, gated MLP); anything else gets no decode signature and says why.
The export checks the rendering anyway: 16 decode steps against the simulation (`parity.decode`).
"""

from __future__ import annotations

import numpy as np
import torch

from .tflite_runtime import write_row

DEFAULT_CACHE_LEN = 256
FAMILY = ("llama", "mistral", "qwen2")  # Hugging Face model types with the layout below (checked, not assumed)


def unsupported_reason(model: torch.nn.Module, cache_len: int) -> str | None:
    """None if `model` has the layout `KVDecode` renders, else why not (one line)."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in FAMILY:
        return f"model type {kind!r} is not one whose decode step is rendered ({', '.join(FAMILY)})"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} is not a Llama-family decoder (model.layers, rotary_emb, lm_head)"
    need = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    for i, layer in enumerate(layers):
        missing = [n for n in need if not hasattr(layer, n)]
        missing += [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(getattr(layer, "self_attn", None), p)]
        if missing:
            return f"layer {i} has no {missing[0]} (a Llama-family layout is needed)"
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and window < cache_len:
        return f"its sliding attention window ({window}) is shorter than the cache ({cache_len} slots); export with cache_len <= {window}"
    return None


def dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv, head_dim


class KVPrefill(torch.nn.Module):
    """The prefill signature of a file with a decode signature: `input_ids [1, seq_len]` -> logits and the
    caches, the prompt's keys and values in slots 0..seq_len-1 and zeros after. A shorter prompt is padded
    at the end; decoding continues at its length, each step overwriting the padding's slot before the mask
    lets it be read."""

    def __init__(self, model: torch.nn.Module, cache_len: int):
        super().__init__()
        self.model, self.cache_len = model, cache_len

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, use_cache=True)
        return (out.logits, *to_signature_layout(out.past_key_values, self.cache_len))


class KVDecode(torch.nn.Module):
    """One decode step over a fixed-size cache (see the module docstring for the signature)."""

    def __init__(self, model: torch.nn.Module, cache_len: int):
        super().__init__()
        self.model, self.cache_len = model, cache_len

    def forward(self, input_ids, input_pos, *cache):
        inner = self.model.model
        _, heads, kv_heads, head_dim = dims(self.model.config)
        half = head_dim // 2
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, input_pos.reshape(1, 1))
        # rotary embedding as x * cos + swap_halves(x) * sin_signed: Hugging Face's rotate_half(x) * sin with its
        # negation moved into the table, once per step instead of once per layer, and the attention scale folded
        # into the queries' tables (exact when it is a power of two, as head_dim ** -0.5 is for head_dim 64): four
        # ops fewer per layer, about 0.2 ms of SmolLM2's ~9 ms INT4 step; the logits came out bitwise the same.
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        tables = {}

        def rotate(x, c, s):
            return x * c + torch.cat([x[..., half:], x[..., :half]], dim=-1) * s

        slots = torch.arange(self.cache_len, dtype=input_pos.dtype)
        mask = torch.where(slots.reshape(1, 1, -1) < input_pos.reshape(1, 1, 1), 0.0, torch.finfo(h.dtype).min)
        presents = []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            scale = float(getattr(attn, "scaling", head_dim ** -0.5))
            if scale not in tables:
                tables[scale] = (cos * scale, sin * scale)
            x = layer.input_layernorm(h)
            # grouped-query attention without repeating the cache: query head h reads kv head h // (heads / kv_heads),
            # so the one token's heads group as [kv_heads, heads / kv_heads, head_dim] (repeating the keys
            # and values instead cost SmolLM2 ~100 ms a step in LiteRT at 256 slots)
            q = rotate(attn.q_proj(x).view(kv_heads, heads // kv_heads, head_dim), *tables[scale])
            k = rotate(attn.k_proj(x).view(kv_heads, 1, head_dim), cos, sin)
            v = attn.v_proj(x).view(kv_heads, 1, head_dim)
            presents += [k, v]
            # one softmax over the cached slots and the token itself: scores [.., cache_len] and [.., 1]
            scores = torch.cat([torch.bmm(q, cache[2 * i].transpose(1, 2)) + mask, torch.bmm(q, k.transpose(1, 2))], dim=-1)
            p = torch.softmax(scores, dim=-1)
            out = torch.bmm(p[..., :self.cache_len], cache[2 * i + 1].transpose(1, 2)) + p[..., self.cache_len:] * v
            out = out.reshape(1, 1, heads * head_dim)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (self.model.lm_head(inner.norm(h)), *presents)


def to_signature_layout(past, cache_len: int) -> list[torch.Tensor]:
    """A Hugging Face cache (batch 1, n <= cache_len tokens) as the signature's caches: per layer the keys
    [kv_heads, cache_len, head_dim] and the values [kv_heads, head_dim, cache_len], zero past slot n."""
    out = []
    for layer in past.layers:
        pad = cache_len - layer.keys.shape[2]
        out += [torch.nn.functional.pad(layer.keys[0], (0, 0, 0, pad)),
                torch.nn.functional.pad(layer.values[0].transpose(1, 2), (0, pad))]
    return out


def empty_cache(config, cache_len: int) -> tuple[torch.Tensor, ...]:
    n, _, kv_heads, head_dim = dims(config)
    return tuple(torch.zeros((kv_heads, cache_len, head_dim) if j % 2 == 0 else (kv_heads, head_dim, cache_len))
                 for j in range(2 * n))


def example_inputs(model: torch.nn.Module, cache_len: int) -> tuple:
    return (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *empty_cache(model.config, cache_len))


def calibration_steps(model: torch.nn.Module, sequences: list[torch.Tensor], cache_len: int, per_sequence: int) -> list[tuple]:
    """Decode-step inputs with real caches: for a few positions p of each sequence, (token p, p, the keys
    and values of tokens 0..p-1 from one PyTorch forward, zero past them)."""
    out = []
    with torch.no_grad():
        for ids in sequences:
            n = min(ids.shape[1], cache_len)
            full = to_signature_layout(model(input_ids=ids[:, :n], use_cache=True).past_key_values, cache_len)
            for p in np.linspace(0, n - 1, per_sequence).astype(int):
                cache = [c.clone() for c in full]
                for j, c in enumerate(cache):  # keep slots 0..p-1
                    (c[:, p:] if j % 2 == 0 else c[..., p:]).zero_()
                out.append((ids[:, p:p + 1], torch.tensor([int(p)]), *cache))
    return out


def zero_caches(step) -> list[np.ndarray]:
    """Empty caches for a decode signature's runner (its inputs after the token and the position)."""
    return [np.zeros(s["shape"], dtype=np.float32) for s in step.input_specs()[2:]]


def run_steps(step, ids: np.ndarray, cache: list[np.ndarray], start: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Feed `ids` [1, n] one token at a time, at positions start, start + 1, ..., through
    `step(ids, pos, *cache) -> [logits, *new rows]`, writing each step's new keys and values into slot pos of
    (copies of) the caches; returns the logits [n, vocab] and the caches after."""
    cache = [np.array(c, dtype=np.float32) for c in cache]
    rows = []
    for i in range(ids.shape[1]):
        out = step(ids[:, i:i + 1], np.array([start + i]), *cache)
        rows.append(np.asarray(out[0]).reshape(-1))
        for j, (c, new) in enumerate(zip(cache, out[1:])):
            write_row(c, j, start + i, np.asarray(new))
    return np.stack(rows), cache
