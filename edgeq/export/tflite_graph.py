"""The float TFLite graph an export starts from: PyTorch -> litert-torch -> labelled flatbuffer.

A quantized model is rendered as plain float layers holding its dequantized weights `(q - zp) *
scale` (never its fake-quant simulation), converted once with litert-torch, and each edgeq layer
is found in the flatbuffer by the exact bytes of its weight. Its weight tensor is renamed
`edgeq/<layer>/weight` and its output `edgeq/<layer>`, so later steps (ai-edge-quantizer recipes,
read-back) address layers by edgeq's names and never by the converter's mangled scopes. A file with
a second signature (a decoder LM's decode step) has a second subgraph reading the same weight
buffers; its tensors get the same labels with `@<subgraph index>` appended (ai-edge-quantizer wants
every tensor name unique in the file).

Conversion is slow (about a minute even for a toy model), so the labelled float graph is cached
by architecture and float contents; a quantized model with the same architecture gets the cached
graph with its own dequantized weights written into the labelled buffers. This module must never
change a weight's values: a layer whose bytes are not found is an error, not a guess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EdgeqError
from ..quantize.modules import QuantConv2d, QuantEmbedding, QuantLinear, quant_layers, set_module

WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "EMBEDDING_LOOKUP")  # input 1: weight / table
GRAPH_VERSION = 6  # bump when a change makes cached graphs wrong (graphs of folded-norm models stay valid)


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


# ---- PyTorch side ---------------------------------------------------------------------------

class _DequantConv(torch.nn.Module):
    """A QuantConv2d as a float conv with its dequantized weight (TF-style static padding kept).

    With `fold` (a BatchNorm's per-channel factor and shift) the norm is folded here, on edgeq's
    grid: the weight is `q * fp32(scale * factor)`, so the converter finds nothing left to fold and
    the file holds edgeq's integers with scales scaled by the BatchNorm factor.
    """

    def __init__(self, q: QuantConv2d, fold=None):
        super().__init__()
        self.static_padding = q.static_padding
        self.conv_args = q.conv_args
        self.weight = torch.nn.Parameter(render_weight(q, fold), requires_grad=False)
        bias = q.bias.detach() if q.bias is not None else None
        if fold is not None:
            bias = fold.shift if bias is None else bias * fold.factor + fold.shift
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x):
        if self.static_padding is not None:
            x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, **self.conv_args)


def rendered_scale(q, fold=None) -> torch.Tensor:
    """The scales the file holds for a layer: edgeq's, times a folded BatchNorm factor if any."""
    if fold is None:
        return q.scale.detach().to(torch.float32)
    return (q.scale.detach().to(torch.float32) * fold.factor[:, None]).to(torch.float32)


def render_weight(q, fold=None) -> torch.Tensor:
    """The float weight in PyTorch layout: `(q - zp) * scale` with the rendered scale."""
    from ..quantize.primitives import dequantize

    w = dequantize(q.qweight, rendered_scale(q, fold), q.zero_point, q.decision.group_size)
    return w.reshape(q.decision.shape).detach().clone()


@dataclass(frozen=True)
class BnFold:
    """An eval-mode BatchNorm2d folded into the conv before it: y = conv(x) * factor + shift."""

    norm: str
    factor: torch.Tensor
    shift: torch.Tensor


def bn_folds(model: torch.nn.Module, example: tuple) -> dict[str, BnFold]:
    """conv layer -> (factor, shift) of the eval-mode BatchNorm2d reading its output, found by tracing one call."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    convs = {n: m for n, m in quant_layers(model).items() if isinstance(m, QuantConv2d)}
    if not norms or not convs:
        return {}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: produced.__setitem__(id(o), (n, o))) for n, m in convs.items()]

    def pre(mod, a, n):
        hit = produced.get(id(a[0]))
        if hit is not None and hit[1] is a[0]:
            pairs[hit[0]] = n

    hooks += [m.register_forward_pre_hook(lambda mod, a, n=n: pre(mod, a, n)) for n, m in norms.items()]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    folds = {}
    for conv, norm in pairs.items():
        bn = norms[norm]
        if bn.training or bn.running_var is None:
            continue
        factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * factor
        folds[conv] = BnFold(norm, factor.detach().float(), shift.detach().float())
    return folds


class _UnfoldableRMSNorm(torch.nn.Module):
    """An RMSNorm whose gain the converter cannot fold into the next layer's weight.

    LiteRT's converter fuses a constant MUL feeding FULLY_CONNECTED into its weight, which would
    change edgeq's integers when norm gains are kept unfolded (the INT4 presets keep them). Here the
    gain multiplies the per-token rsqrt first, so the MUL feeding the layer has no constant operand.
    """

    def __init__(self, norm):
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (x.to(torch.float32) * (torch.rsqrt(variance + self.eps) * self.weight)).to(x.dtype)


class _UnfoldableLayerNorm(torch.nn.Module):
    """A LayerNorm over the last axis whose gain the converter cannot fold into the next layer's weight (BERT-style
    encoders: every query/key/value and first FFN linear reads one), the same way as `_UnfoldableRMSNorm`; the
    shift stays a constant ADD, which the converter may move into the next layer's bias, never its weight."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        centered = x - x.mean(-1, keepdim=True)
        y = centered * (torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight)
        return y if self.bias is None else y + self.bias


def _gained_norms(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The norms with a gain a converter could fold into the next layer: name -> their unfoldable rendering."""
    out = {}
    for n, m in model.named_modules():
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        if type(m).__name__.endswith("RMSNorm"):
            out[n] = _UnfoldableRMSNorm(m)
        elif isinstance(m, torch.nn.LayerNorm) and len(m.normalized_shape) == 1:
            out[n] = _UnfoldableLayerNorm(m)
    return out


def _dequant_module(q, fold=None) -> torch.nn.Module:
    """The float layer rendering a quantized one: its dequantized weight in a plain module."""
    if isinstance(q, QuantEmbedding):
        return torch.nn.Embedding(q.num_embeddings, q.embedding_dim, q.padding_idx, _weight=render_weight(q), _freeze=True)
    if isinstance(q, QuantLinear):
        return _dequant_linear(q)
    return _DequantConv(q, fold)


def _dequant_linear(q: QuantLinear) -> torch.nn.Linear:
    lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    lin.weight = torch.nn.Parameter(render_weight(q), requires_grad=False)
    if q.bias is not None:
        lin.bias = q.bias
    return lin


@contextlib.contextmanager
def float_rendering(model: torch.nn.Module, folds: dict | None = None):
    """Temporarily swap every quantized layer for a float layer with its dequantized weight
    (each BatchNorm in `folds` for an identity, its factor folded into the conv before it, and each
    RMSNorm / LayerNorm for a rendering whose gain the converter cannot fold into the next weight)."""
    folds = folds or {}
    layers = quant_layers(model)
    norms = {f.norm: model.get_submodule(f.norm) for f in folds.values()}
    gained = _gained_norms(model) if layers else {}
    originals = {n: model.get_submodule(n) for n in [*norms, *gained]}
    try:
        for name, q in layers.items():
            set_module(model, name, _dequant_module(q, folds.get(name)))
        for n in norms:
            set_module(model, n, torch.nn.Identity())
        for n, m in gained.items():
            set_module(model, n, m)
        yield model
    finally:
        for name, q in layers.items():
            set_module(model, name, q)
        for n, m in originals.items():
            set_module(model, n, m)


class _LogitsLM(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


class _Encoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _FirstOutput(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args):
        out = self.m(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "logits", out)


def unused_layers(bundle, model: torch.nn.Module, seq_len: int) -> set[str]:
    """The quantized layers the exported module's outputs do not depend on (no gradient reaches them from one
    forward of the example inputs): what the converter prunes."""
    layers = quant_layers(model)
    taps: dict[str, torch.Tensor] = {}

    def tap(name):
        def hook(_module, _args, out):
            taps[name] = out.detach().requires_grad_()
            return taps[name]
        return hook

    hooks = [m.register_forward_hook(tap(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            out = graph_module(bundle, model)(*example_inputs(bundle, seq_len))
            reached = torch.autograd.grad(out.float().sum(), list(taps.values()), allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, g in zip(taps, reached) if g is None} | (set(layers) - set(taps))


def graph_module(bundle, model: torch.nn.Module) -> torch.nn.Module:
    """The module a file is exported from: positional inputs, the main output (logits) first."""
    if bundle.kind == "causal-lm":
        return _LogitsLM(model).eval()
    if bundle.kind == "encoder":
        return _Encoder(model).eval()
    return _FirstOutput(model).eval()


def example_inputs(bundle, seq_len: int) -> tuple:
    """Fixed-shape example inputs: TFLite graphs here are static (token models use `seq_len`)."""
    if bundle.kind == "causal-lm":
        return (torch.zeros(1, seq_len, dtype=torch.long),)
    if bundle.kind == "encoder":
        return (torch.zeros(1, seq_len, dtype=torch.long), torch.ones(1, seq_len, dtype=torch.long))
    if not bundle.example_inputs:
        raise EdgeqError(f"tflite: model {bundle.reference!r} has no example inputs to fix the graph's shapes")
    return tuple(t[:1] for t in bundle.example_inputs)


def tflite_weight(module, fold=None) -> np.ndarray:
    """A quantized layer's dequantized weight in TFLite's layout (FC [out, in]; embedding table [rows, dim];
    conv OHWI; depthwise 1HWO)."""
    w = render_weight(module, fold).to(torch.float32).numpy()
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return np.ascontiguousarray(w)
    if module.conv_args["groups"] == 1:
        return np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    if module.conv_args["groups"] == module.in_channels == module.out_channels:
        return np.ascontiguousarray(w.transpose(1, 2, 3, 0))
    raise EdgeqError(f"tflite: layer {module.decision.name}: grouped convolutions other than depthwise have no TFLite kernel")


# ---- flatbuffer side ------------------------------------------------------------------------

def read_model(buf: bytes):
    s = schema()
    return s.ModelT.InitFromObj(s.Model.GetRootAs(buf, 0))


def write_model(model_t) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model_t.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def op_names(model_t) -> list[str]:
    s = schema()
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    return [names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), str(oc.builtinCode)) for oc in model_t.operatorCodes]


def weight_ops(model_t):
    """(subgraph, op, op name) for every op with a weight input, in graph order."""
    codes = op_names(model_t)
    for sg in model_t.subgraphs:
        for op in sg.operators:
            name = codes[op.opcodeIndex]
            if name in WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
                yield sg, op, name


def label(layer: str, subgraph: int = 0, weight: bool = False) -> str:
    """The name of a layer's output (or weight) tensor in subgraph `subgraph`."""
    return f"edgeq/{layer}" + ("/weight" if weight else "") + (f"@{subgraph}" if subgraph else "")


def labelled(name: str | bytes) -> tuple[str, bool] | None:
    """(layer, is its weight) for a tensor name `label` made, else None."""
    name = name.decode() if isinstance(name, bytes) else name
    if not name.startswith("edgeq/"):
        return None
    name = re.sub(r"@\d+$", "", name[len("edgeq/"):])
    return (name[:-len("/weight")], True) if name.endswith("/weight") else (name, False)


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()


def label_layers(model_t, weights: dict[str, np.ndarray], kinds: dict[str, str] | None = None, unused=None) -> dict[str, str]:
    """Rename each layer's weight/output tensors after the layer; returns layer -> TFLite op name.

    Layers are found by the exact bytes of their float weight, in every subgraph (a decoder LM's
    prefill and decode signatures). A layer found nowhere is an error (the converter changed its weight,
    e.g. folded a BatchNorm into it) unless `unused()` (called only then) names it: a layer the exported
    outputs do not depend on, which the converter drops (BERT's pooler under an encoder's
    last_hidden_state); it is then simply not in the returned mapping. Identical weights go in graph
    order, an embedding layer (`kinds`) to an EMBEDDING_LOOKUP first. A tied head and its embedding
    table are one tensor in the converted graph: it keeps the first layer's label (`layer_ops`).
    """
    kinds = kinds or {}
    digests: dict[str, list[str]] = {}
    for name, w in weights.items():
        digests.setdefault(_digest(w), []).append(name)
    found: dict[str, str] = {}
    index = {id(sg): k for k, sg in enumerate(model_t.subgraphs)}
    by_digest, subgraph = {}, None
    for sg, op, opname in weight_ops(model_t):
        if sg is not subgraph:  # each signature's subgraph reads every weight (one shared buffer each)
            by_digest, subgraph = {k: list(v) for k, v in digests.items()}, sg
        wt = sg.tensors[op.inputs[1]]
        data = model_t.buffers[wt.buffer].data
        if data is None or wt.type != schema().TensorType.FLOAT32:
            continue
        names = by_digest.get(hashlib.sha1(bytes(np.asarray(data, dtype=np.uint8))).hexdigest())
        if not names:
            continue
        lookup = opname == "EMBEDDING_LOOKUP"
        name = next((n for n in names if (kinds.get(n) == "embedding") == lookup), names[0])
        names.remove(name)  # identical weights: any assignment is byte-identical
        if labelled(wt.name) is None:
            wt.name = label(name, index[id(sg)], weight=True).encode()
        sg.tensors[op.outputs[0]].name = label(name, index[id(sg)]).encode()
        found[name] = opname
    missing = [n for n in weights if n not in found]
    if missing and unused is not None:
        dropped = unused()
        missing = [n for n in missing if n not in dropped]
    if missing:
        raise EdgeqError(f"tflite: the converter changed the weight of layer {missing[0]!r} (and {len(missing) - 1} more), "
                         "e.g. by folding a BatchNorm into it; its integers cannot be carried exactly. "
                         "Fold such layers before quantizing, or export --variant fp32")
    return found


def layer_ops(model_t, layers) -> dict[str, list[tuple]]:
    """layer -> its labelled ops as (subgraph, op), one per subgraph, in one pass over the graph (a tied head's
    op reads its embedding table's weight tensor)."""
    out: dict[str, list[tuple]] = {}
    for sg, op, _ in weight_ops(model_t):
        found = labelled(sg.tensors[op.outputs[0]].name)
        if found is not None and not found[1] and found[0] in layers:
            out.setdefault(found[0], []).append((sg, op))
    missing = [n for n in layers if n not in out]
    if missing:
        raise EdgeqError(f"tflite: layer {missing[0]!r} has no labelled op in the graph")
    return out


def set_weights(model_t, weights: dict[str, np.ndarray]) -> None:
    """Write each layer's float weight into its labelled buffer (shapes must agree)."""
    for sg, op, _ in weight_ops(model_t):
        wt = sg.tensors[op.inputs[1]]
        found = labelled(wt.name)
        if found is not None and found[1]:
            layer = found[0]
            w = weights[layer]
            assert list(wt.shape) == list(w.shape), (layer, list(wt.shape), w.shape)
            model_t.buffers[wt.buffer].data = np.frombuffer(np.ascontiguousarray(w, dtype=np.float32).tobytes(), dtype=np.uint8)


def _float_digest(model: torch.nn.Module) -> str:
    """Hash of every float tensor outside the quantized layers (biases included)."""
    h = hashlib.sha256()
    qnames = set(quant_layers(model))
    for k, v in sorted(model.state_dict().items()):
        layer = k.rpartition(".")[0]
        if layer in qnames and not k.endswith(".bias"):
            continue
        if v.is_floating_point():
            h.update(k.encode())
            h.update(v.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def graph_key(bundle, model: torch.nn.Module, seq_len: int, folds: dict | None = None, cache_len: int | None = None) -> str:
    layers = {n: [type(m).__name__, list(m.decision.shape)] for n, m in quant_layers(model).items()}
    ex = [list(t.shape) + [str(t.dtype)] for t in example_inputs(bundle, seq_len)]
    from importlib.metadata import version

    text = json.dumps([GRAPH_VERSION, sorted(folds or {}), bundle.reference, bundle.kind, layers, ex, _float_digest(model),
                       torch.__version__, version("litert-torch"), cache_len], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def float_graph(bundle, model: torch.nn.Module, seq_len: int, cache: bool = True, folds: dict | None = None,
                cache_len: int | None = None) -> tuple[bytes, dict[str, str], float]:
    """The labelled float TFLite graph of `model` with its dequantized weights (BatchNorms in `folds` folded),
    with a `decode` signature over a `cache_len`-slot KV cache when `cache_len` is given.

    Returns (flatbuffer bytes, layer -> op name, conversion seconds; 0 when cached).
    """
    import time

    from ..cache import cache_dir
    from ..fileio import write_bytes_atomic, write_json_atomic, read_json

    layers = quant_layers(model)
    folds = folds or {}
    weights = {n: tflite_weight(m, folds.get(n)) for n, m in layers.items()}
    key = graph_key(bundle, model, seq_len, folds, cache_len)
    cached = cache_dir("tflite-graphs") / f"{key}.tflite"
    index = cached.with_suffix(".json")
    if cache and cached.is_file() and index.is_file():
        model_t = read_model(cached.read_bytes())
        set_weights(model_t, weights)
        return write_model(model_t), read_json(index)["layers"], 0.0
    t0 = time.perf_counter()
    buf = convert(bundle, model, seq_len, folds, cache_len)
    seconds = time.perf_counter() - t0
    model_t = read_model(buf)
    found = label_layers(model_t, weights, {n: m.decision.kind for n, m in layers.items()},
                         unused=lambda: unused_layers(bundle, model, seq_len))
    out = write_model(model_t)
    if cache:
        write_bytes_atomic(cached, out)
        write_json_atomic(index, {"reference": bundle.reference, "seq_len": seq_len, "cache_len": cache_len, "layers": found})
    return out, found, seconds


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module, enable: bool):
    """Hugging Face's eager attention instead of sdpa while converting (`enable`): litert-torch lowers sdpa by scaling
    the queries and the keys by sqrt(scale) each, constant MULs the converter folds into the query and key
    projections' weights when nothing stands between them (BERT-style encoders; a decoder's rotary embedding does),
    which would change edgeq's integers. Eager attention scales the scores after the matmul."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not enable or before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def convert(bundle, model: torch.nn.Module, seq_len: int, folds: dict | None = None, cache_len: int | None = None) -> bytes:
    """litert-torch conversion of the float rendering of `model`: a `serving_default` signature, and with
    `cache_len` one that also returns the KV caches (`tflite_decode.KVPrefill`) and a `decode` signature
    (`tflite_decode.KVDecode`) reading the same weights."""
    import tempfile

    import litert_torch

    with float_rendering(model, folds), _eager_attention(model, bundle.kind == "encoder"), torch.no_grad():
        module = graph_module(bundle, model)
        try:
            if cache_len:
                from .tflite_decode import KVDecode, KVPrefill, example_inputs as decode_inputs

                edge = (litert_torch.signature("serving_default", KVPrefill(model, cache_len).eval(), example_inputs(bundle, seq_len))
                        .signature("decode", KVDecode(model, cache_len).eval(), decode_inputs(model, cache_len)).convert())
            else:
                edge = litert_torch.convert(module, example_inputs(bundle, seq_len))
        except Exception as exc:  # the converter fails in many ways on unsupported ops
            raise EdgeqError(f"tflite: litert-torch cannot convert {bundle.reference!r}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        with tempfile.TemporaryDirectory(prefix="edgeq-tflite-") as tmp:
            path = Path(tmp) / "float.tflite"
            edge.export(str(path))
            return path.read_bytes()
