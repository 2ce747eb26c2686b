"""The KV-cache decode-step signature of a decoder LM's TFLite file.

`decode(input_ids [1, 1], input_pos [1], mask [1, 1, slots], k_0, v_0, ...) -> (logits [1, 1, vocab], k_new_0,
v_new_0, ...)` with every key cache shaped [kv_heads, slots, head_dim], every value cache stored transposed,
[kv_heads, head_dim, slots], and every new key and value [kv_heads, 1, head_dim]. The file declares cache_len
slots; `dynamic_slots` makes the count the runtime's choice (litert-torch converts static shapes only). The step
attends over the cache slots the mask leaves at 0 (0..input_pos-1: `tflite_runtime.attention_mask`) and
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
read one copy of each weight. `KVDecode` renders Llama-family layouts (model types llama (SmolLM2 too), mistral,
qwen2, qwen3 (its per-head query and key norms): q/k/v/o projections, pre-norms, gated MLP), tuned for LiteRT;
`HFDecode` (tflite_hfdecode) runs any other Hugging Face decoder's own layers with edgeq's attention over the caches,
once a probe shows it reproduces the model's logits; anything else gets no decode signature and says why.
The export checks the rendering anyway: 16 decode steps against the simulation (`parity.decode`).
The export's decode-specific steps live here too: `plan` (the cache length, or why no decode signature),
`signature_meta` (FILE.json `graph.decode`), `parity` and `resized_parity`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EdgeqError
from ..models.hf import query_scaling, returned_cache, with_cache
from .meta import parity_metrics
from .tflite_runtime import DecodeSession, attention_mask, slot_axis, slot_range, write_row

DEFAULT_CACHE_LEN = 256
CACHE_INPUT = 3  # the decode signature's inputs: input_ids, input_pos, mask, then the caches
FAMILY = ("llama", "mistral", "qwen2", "qwen3")  # Hugging Face model types with the layout below (checked, not assumed)


def plan(bundle, model, cache_len: int | None, seq_len: int) -> tuple[int, str | None]:
    """(slots of the decode signature's cache, 0 for none; why there is none, if a decoder LM has none).
    The default is 256 slots, or seq_len if longer: the prefill signature fills the cache with its whole input."""
    if bundle.kind != "causal-lm":
        if cache_len:
            raise EdgeqError(f"tflite: cache_len applies to decoder LMs, not to {bundle.reference!r} (kind: {bundle.kind})")
        return 0, None
    if cache_len is not None and (not isinstance(cache_len, int) or isinstance(cache_len, bool) or cache_len < 0):
        raise EdgeqError(f"tflite: cache_len must be a whole number >= 0 (0: no decode signature), not {cache_len!r}")
    if cache_len == 0:
        return 0, "no decode signature: exported with cache_len = 0"
    if cache_len is not None and cache_len < seq_len:
        raise EdgeqError(f"tflite: cache_len ({cache_len}) must be at least seq_len ({seq_len}): the prefill signature "
                         "writes its whole input into the cache (or cache_len = 0: no decode signature)")
    slots = cache_len or max(DEFAULT_CACHE_LEN, seq_len)
    reason = unsupported_reason(model, slots)
    if reason:
        if cache_len:
            raise EdgeqError(f"tflite: no decode signature for {bundle.reference!r}: {reason}; or export with cache_len = 0")
        return 0, f"no decode signature: {reason}"
    return slots, None


def signature_meta(model, cache_len: int, static_slots: str | None) -> dict:
    shapes = cache_shapes(model)
    slots = "slots" if static_slots is None else str(cache_len)
    return {"signature": "decode", "cache_len": cache_len,
            "dynamic_slots": static_slots is None,
            "slots_note": ("the slot count is the runtime's choice: the mask and caches declare cache_len slots and may be "
                           "resized to any count (shape signature -1; DecodeSession(path, slots=N, grow=True))")
            if static_slots is None else f"fixed at cache_len: {static_slots}",
            "inputs": ["input_ids [1, 1] int32", "input_pos [1] int32 (the token's position: the slot its key and value go to)",
                       f"mask [1, 1, {slots}] float32 (0 for the slots before input_pos, float32's lowest value for the rest)"]
            + [name for i, (kv, dk, dv) in enumerate(shapes) for name in (f"k_{i} [{kv}, {slots}, {dk}] float32",
                                                                          f"v_{i} [{kv}, {dv}, {slots}] float32 (stored transposed)")],
            "outputs": ["logits [1, 1, vocab]"] + [f"{kind}_new_{i} [{kv}, 1, {d}] float32"
                                                   for i, (kv, dk, dv) in enumerate(shapes) for kind, d in (("k", dk), ("v", dv))],
            "step": "the model's own Hugging Face layers, attention over the caches by edgeq (HFDecode)"
                    if generic_step(model, cache_len) else "edgeq's own (Llama-family layout)",
            "usage": "run the prompt through serving_default (padded at the end to seq_len), which returns the logits "
                     "and these caches; then decode from input_pos = the prompt's length. The step reads the caches "
                     "(the slots the mask leaves at 0: those before input_pos) and returns its token's key and value: "
                     "write them into slot input_pos before the next step (a key into k[:, input_pos, :], a value into "
                     "v[:, :, input_pos]; in place in the interpreter's input buffers, so the caches are never copied: "
                     "edgeq.export.tflite_runtime.DecodeSession does this). Or start from zero caches and "
                     "feed the prompt one step per token. Keys are stored after rotary embedding."}


def unsupported_reason(model: torch.nn.Module, cache_len: int) -> str | None:
    """None if `model` gets a decode step (`decode_module`: a Llama-family model with the layout `KVDecode` renders,
    any other one `HFDecode` reproduces on its probe), else why not (one line)."""
    if generic_step(model, cache_len):
        from .tflite_hfdecode import HFDecode

        window = sliding_window(model)
        return HFDecode.unsupported_reason(model, window if window and window <= cache_len else None)
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
    return None


def type_of(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def sliding_window(model: torch.nn.Module) -> int | None:
    """The model's sliding attention window (its sliding layers attend over the last `window` positions), if any."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None


def generic_step(model: torch.nn.Module, cache_len: int) -> bool:
    """Whether the decode step is `HFDecode`: a model outside the Llama family, or one whose sliding window is not
    longer than the cache (`KVDecode` attends over every cached slot)."""
    window = sliding_window(model)
    return type_of(model) not in FAMILY or bool(window and window <= cache_len)


def decode_module(model: torch.nn.Module, cache_len: int) -> torch.nn.Module:
    """The decode step `unsupported_reason` passed: edgeq's own for the Llama family, else `HFDecode`."""
    from .tflite_hfdecode import HFDecode

    return (HFDecode if generic_step(model, cache_len) else KVDecode)(model).eval()


def full_cache(model: torch.nn.Module, ids: torch.Tensor):
    """The model's cache after a forward of `ids`, every layer holding every token: a sliding-window layer of the
    cache Hugging Face makes by default keeps the last window - 1 only, which the signature's slots cannot follow."""
    from transformers.cache_utils import DynamicCache

    return with_cache(model, DynamicCache(), input_ids=ids)


@torch.no_grad()
def cache_shapes(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """Per layer (kv heads, key head dim, value head dim) of the signature's caches, read off the model's own cache
    after a two-token forward (not from its config: families name them differently, and some vary by layer)."""
    past = returned_cache(with_cache(model, None, input_ids=torch.zeros(1, 2, dtype=torch.long)))
    return [(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in past.layers]


def dims(config) -> tuple[int, int, int, int]:
    """(layers, query heads, kv heads, head dim)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv, head_dim


def head_norm(attn: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """`x` through the attention module's per-head norm `name` (Qwen3's q_norm / k_norm, over head_dim, before the
    rotary embedding), if it has one."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


class KVPrefill(torch.nn.Module):
    """The prefill signature of a file with a decode signature: `input_ids [1, seq_len]` -> logits and the
    caches, the prompt's keys and values in slots 0..seq_len-1 and zeros after. A shorter prompt is padded
    at the end; decoding continues at its length, each step overwriting the padding's slot before the mask
    lets it be read."""

    def __init__(self, model: torch.nn.Module, cache_len: int):
        super().__init__()
        self.model, self.cache_len = model, cache_len

    def forward(self, input_ids):
        out = full_cache(self.model, input_ids)
        return (out.logits, *to_signature_layout(returned_cache(out), self.cache_len))


class KVDecode(torch.nn.Module):
    """One decode step over the caches it is given (see the module docstring for the signature): nothing in it
    names their slot count, which the example inputs fix at conversion."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, input_pos, mask, *cache):
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

        presents = []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            scale = query_scaling(attn, head_dim ** -0.5)
            if scale not in tables:
                tables[scale] = (cos * scale, sin * scale)
            x = layer.input_layernorm(h)
            # grouped-query attention without repeating the cache: query head h reads kv head h // (heads / kv_heads),
            # so the one token's heads group as [kv_heads, heads / kv_heads, head_dim] (repeating the keys
            # and values instead cost SmolLM2 ~100 ms a step in LiteRT at 256 slots)
            q = head_norm(attn, "q_norm", attn.q_proj(x).view(kv_heads, heads // kv_heads, head_dim))
            k = head_norm(attn, "k_norm", attn.k_proj(x).view(kv_heads, 1, head_dim))
            q, k = rotate(q, *tables[scale]), rotate(k, cos, sin)
            v = attn.v_proj(x).view(kv_heads, 1, head_dim)
            presents += [k, v]
            # one softmax over the token itself and the cached slots: scores [.., 1] then [.., slots], the token first so
            # that both parts are sliced off without naming the slot count (`dynamic_slots` makes it a run-time choice)
            scores = torch.cat([torch.bmm(q, k.transpose(1, 2)), torch.bmm(q, cache[2 * i].transpose(1, 2)) + mask], dim=-1)
            p = torch.softmax(scores, dim=-1)
            out = torch.bmm(p[..., 1:], cache[2 * i + 1].transpose(1, 2)) + p[..., :1] * v
            out = out.reshape(1, 1, heads * head_dim)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (self.model.lm_head(inner.norm(h)), *presents)


def dynamic_slots(model_t, cache_len: int) -> str | None:
    """Make the `decode` signature's slot count a run-time choice in the converted flatbuffer (`model_t`, edited in
    place): its mask and cache inputs get a dynamic slot dimension (shape signature -1), so a runtime may resize them
    to any count and LiteRT re-derives every shape in the step from them (the declared shape stays `cache_len`).
    litert-torch converts static shapes only; the step is written so that the slot count appears in one kind of
    constant, the size of the slice taking the cached slots' probabilities (after the token's own). Each such SLICE
    becomes a STRIDED_SLICE from the same begin to the end of every axis (end_mask): XNNPACK runs that one, while
    it leaves a SLICE of size -1 ("to the end") to LiteRT's built-in kernel, which cut SmolLM2's step into one
    XNNPACK partition per layer (31 instead of 1). Returns None when done, else why not, and then changes nothing.
    Whether no other constant names the slot count (a value alone cannot tell it from a head size of the same
    number) is `resize_check`'s to prove, by running the result."""
    from .tflite_flatbuffer import op_names, schema
    from .tflite_graph import int32_constant, op_code

    s = schema()
    sig = next((d for d in model_t.signatureDefs if d.signatureKey == b"decode"), None)
    if sig is None:
        return "no decode signature"
    sg = model_t.subgraphs[sig.subgraphIndex]
    codes = op_names(model_t)

    def ints(index: int):
        t = sg.tensors[index]
        data = model_t.buffers[t.buffer].data
        if t.type != s.TensorType.INT32 or data is None or not len(data):
            return None
        return np.frombuffer(bytes(np.asarray(data, dtype=np.uint8)), dtype=np.int32).tolist()

    slices = [op for op in sg.operators if codes[op.opcodeIndex] == "SLICE" and int(sg.tensors[op.inputs[0]].shape[-1]) == cache_len + 1
              and (ints(op.inputs[2]) or [None])[-1] == cache_len and (ints(op.inputs[1]) or [None])[-1] == 1]
    if not slices:
        return "no slice of the cached slots' probabilities found"
    rank = int(sg.tensors[slices[0].inputs[2]].shape[0])  # one size per dimension of the sliced tensor

    end = int32_constant(model_t, sg, [0] * rank, b"edgeq/slots_end")
    strides = int32_constant(model_t, sg, [1] * rank, b"edgeq/slots_strides")
    strided_slice = op_code(model_t, codes, "STRIDED_SLICE")
    for op in slices:
        options = s.StridedSliceOptionsT()
        options.endMask = (1 << rank) - 1  # every axis to its end: the slot axis whatever its size, the others whole
        op.opcodeIndex = strided_slice
        op.inputs = np.array([op.inputs[0], op.inputs[1], end, strides], dtype=np.int32)
        op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.StridedSliceOptions, options
    inputs = set(int(i) for i in sg.inputs)
    for index, t in enumerate(sg.tensors):  # intermediate shapes: unpinned (-1), so each op re-derives them when resized
        if index not in inputs and not (model_t.buffers[t.buffer].data is not None and len(model_t.buffers[t.buffer].data)):
            t.shapeSignature = np.full(len(t.shape), -1, dtype=np.int32)
    names = {m.name.decode(): m.tensorIndex for m in sig.inputs}
    for position, name in enumerate(sorted(names, key=lambda n: int(n.rpartition("_")[2]))):
        if position < CACHE_INPUT - 1:
            continue
        t = sg.tensors[names[name]]
        dims = [int(x) for x in t.shape]
        dims[slot_axis(position)] = -1
        t.shapeSignature = np.array(dims, dtype=np.int32)
    return None


def resize_check(buf: bytes, cache_len: int, steps: int = 4) -> str | None:
    """None if the decode signature of `buf` (a float graph after `dynamic_slots`) gives the same logits with its
    slots resized as at the declared count, over `steps` steps from empty caches; else why not (one line)."""
    slots = cache_len + 7
    try:
        session = DecodeSession(buf)  # one interpreter: a model's packed weights once
        session.reset()
        declared = [session.step(pos + 1, pos) for pos in range(min(steps, cache_len))]
        session.resize(slots)
        session.reset()
        for pos, a in enumerate(declared):
            b = session.step(pos + 1, pos)
            if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
                return f"resized to {slots} slots, step {pos} gave other logits (max abs {float(np.max(np.abs(a - b))):.3g})"
    except (EdgeqError, RuntimeError, ValueError) as exc:
        return f"resized to {slots} slots, the step failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def to_signature_layout(past, cache_len: int) -> list[torch.Tensor]:
    """A Hugging Face cache (batch 1, n <= cache_len tokens) as the signature's caches: per layer the keys
    [kv_heads, cache_len, head_dim] and the values [kv_heads, head_dim, cache_len], zero past slot n."""
    out = []
    for layer in past.layers:
        pad = cache_len - layer.keys.shape[2]
        out += [torch.nn.functional.pad(layer.keys[0], (0, 0, 0, pad)),
                torch.nn.functional.pad(layer.values[0].transpose(1, 2), (0, pad))]
    return out


def empty_cache(model: torch.nn.Module, cache_len: int) -> tuple[torch.Tensor, ...]:
    return tuple(t for kv, dk, dv in cache_shapes(model) for t in (torch.zeros(kv, cache_len, dk), torch.zeros(kv, dv, cache_len)))


def example_inputs(model: torch.nn.Module, cache_len: int) -> tuple:
    return (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
            torch.from_numpy(attention_mask(0, cache_len)), *empty_cache(model, cache_len))


def calibration_steps(model: torch.nn.Module, sequences: list[torch.Tensor], cache_len: int, per_sequence: int) -> list[tuple]:
    """Decode-step inputs with real caches: for a few positions p of each sequence, (token p, p, the keys
    and values of tokens 0..p-1 from one PyTorch forward, zero past them)."""
    out = []
    with torch.no_grad():
        for ids in sequences:
            n = min(ids.shape[1], cache_len)
            full = to_signature_layout(returned_cache(full_cache(model, ids[:, :n])), cache_len)
            for p in np.linspace(0, n - 1, per_sequence).astype(int):
                cache = [c.clone() for c in full]
                for j, c in enumerate(cache):  # keep slots 0..p-1
                    slot_range(c, j, start=int(p)).zero_()
                out.append((ids[:, p:p + 1], torch.tensor([int(p)]), torch.from_numpy(attention_mask(int(p), cache_len)), *cache))
    return out


def zero_caches(step) -> list[np.ndarray]:
    """Empty caches for a decode signature's runner (its inputs after the token, the position and the mask)."""
    return [np.zeros(s["shape"], dtype=np.float32) for s in step.input_specs()[CACHE_INPUT:]]


def run_steps(step, ids: np.ndarray, cache: list[np.ndarray], start: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Feed `ids` [1, n] one token at a time, at positions start, start + 1, ..., through
    `step(ids, pos, mask, *cache) -> [logits, *new rows]`, writing each step's new keys and values into slot pos of
    (copies of) the caches; returns the logits [n, vocab] and the caches after."""
    cache = [np.array(c, dtype=np.float32) for c in cache]
    slots = cache[0].shape[1]
    rows = []
    for i in range(ids.shape[1]):
        out = step(ids[:, i:i + 1], np.array([start + i]), attention_mask(start + i, slots), *cache)
        rows.append(np.asarray(out[0]).reshape(-1))
        for j, (c, new) in enumerate(zip(cache, out[1:])):
            write_row(c, j, start + i, np.asarray(new))
    return np.stack(rows), cache


def parity(step, first, ids: np.ndarray, ref: np.ndarray, prefill: np.ndarray, cache_len: int,
                   steps: int = 16) -> tuple[dict, np.ndarray]:
    """The decode signature (`step`) against the simulation's logits at the same positions of the first
    held-back sample: token by token from an empty cache over its first tokens, and continuing after the
    prefill signature (`first`) ran its first half (padded with zeros to the graph's length, as a shorter
    prompt is)."""
    n = min(steps, ids.shape[1], cache_len)
    got, _ = run_steps(step, ids[:, :n], zero_caches(step))
    out = parity_metrics([ref[0, :n]], [got])
    out["vs_prefill_max_abs"] = float(np.max(np.abs(got - prefill.reshape(ref.shape)[0, :n])))
    out["inputs"] = f"{n} tokens of the first held-back sample, one step each from an empty cache"
    half, seq = ids.shape[1] // 2, ids.shape[1]
    k = min(steps, seq - half)
    prompt = np.zeros_like(ids)
    prompt[:, :half] = ids[:, :half]
    cont, _ = run_steps(step, ids[:, half:half + k], first(prompt)[1:], start=half)
    after = parity_metrics([ref[0, half:half + k]], [cont])
    out["after_prefill"] = {**{key: after[key] for key in ("max_abs", "cos_min", "top1_agree", "rows")},
                            "inputs": f"prefill of the first {half} tokens padded to {seq}, then {k} decode steps"}
    return out, got


def resized_parity(buf: bytes, ids: np.ndarray, got: np.ndarray, cache_len: int) -> dict:
    """The decode signature with its slots resized (`dynamic_slots`) to just the steps `got` covers, then doubled and
    more: the same tokens from an empty cache must give the declared shape's logits (`got`)."""
    n = got.shape[0]
    start = max(1, n // 2)
    session = DecodeSession(buf, slots=start, grow=True)
    session.reset()
    rows = np.stack([session.step(int(ids[0, i]), i) for i in range(n)])
    return {"slots": f"{start}, grown to {session.cache_len} (declared {cache_len})",
            "max_abs_vs_declared": float(np.max(np.abs(rows - got)))}
