"""Float ONNX graphs of a model (torch side of the ONNX exporter).

The quantized layers are swapped for plain float layers holding their dequantized weights, the
model is wrapped so its inputs and outputs are flat tensors (`input_ids` -> `logits` plus present
key/values for decoder LMs; a decode step that also takes past key/values), and exported with
`torch.onnx.export(dynamo=True)` WITHOUT the onnxscript optimizer: that keeps every parameter as
an initializer named after its module (`model.<layer>.weight`), which is how `onnx_quant` finds
each layer's weight. ONNX Runtime does the constant folding when it loads the file.

Exports are slow (tens of seconds even for tiny models, about a minute per graph for SmolLM2-135M on
2 cores), so the graph of a given architecture is traced once and re-bound to another model's
tensors by name: kept per process, and on disk (the user cache, `onnx-graphs/`) for models whose
code comes from installed packages, keyed by the structure, the code's source files and the
versions of torch, onnx, onnxscript and transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import sysconfig
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import EdgeqError
from ..models.hf import decoder_attention  # traced into decoder LMs' graphs (export/onnx.py): part of the cache key
from ..models.hf import returned_cache, with_cache
from ..quantize.modules import QuantEmbedding, QuantLinear, quant_layers, set_module
from .batchnorm import DequantConv

OPSET = 21
PREFIX = "model"  # the wrapper's attribute holding the model: initializers are named "model.<fqn>"
_CACHE: dict[str, onnx.ModelProto] = {}  # structural key -> graph whose bound initializers are emptied
_CACHE_SIZE = 4


def _float_linear(weight: torch.Tensor, bias) -> torch.nn.Linear:
    # a plain nn.Linear, so the float and the quantized model share one graph structure (and cache entry)
    out_f, in_f = weight.shape
    lin = torch.nn.Linear(in_f, out_f, bias=bias is not None)
    lin.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = bias
    return lin


@contextlib.contextmanager
def dequantized(model: torch.nn.Module, folds: dict | None = None):
    """Temporarily replace QuantLinear / QuantConv2d by float layers holding `(q - zp) * scale`, and each
    BatchNorm in `folds` (`batchnorm.bn_folds`) by an identity, folded into the conv before it."""
    originals = quant_layers(model)
    folds = folds or {}
    norms = {f.norm: model.get_submodule(f.norm) for f in folds.values()}
    try:
        shared: dict[int, torch.nn.Parameter] = {}  # id(qweight) -> float weight: a tied head stays tied in the graph
        for name, m in originals.items():
            if isinstance(m, (QuantLinear, QuantEmbedding)):
                weight = shared.get(id(m.qweight))
                if weight is None:
                    weight = shared[id(m.qweight)] = torch.nn.Parameter(m.weight_2d().detach().clone(), requires_grad=False)
                if isinstance(m, QuantEmbedding):
                    new = torch.nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, _weight=weight, _freeze=True)
                    new.weight = weight  # the very Parameter a tied head holds: one initializer in the graph
                else:
                    new = _float_linear(weight, m.bias)
            else:
                new = DequantConv(m, folds.get(name))
            set_module(model, name, new)
        for name in norms:
            set_module(model, name, torch.nn.Identity())
        yield originals
    finally:
        for name, m in [*originals.items(), *norms.items()]:
            set_module(model, name, m)


# --- wrappers: flat tensors in, flat tensors out ------------------------------------------------

def _flat_cache(cache) -> list[torch.Tensor]:
    flat = []
    for layer in cache.layers:
        flat += [layer.keys, layer.values]
    return flat


def cache_layer_types(config) -> list[str]:
    """Each layer's cache in the graphs, as Hugging Face's cache lays them out (`layer_types`, else inferred from
    `sliding_window`): a "sliding_attention" layer keeps its last window - 1 tokens (Gemma 2 / 3), and a decode step
    counts positions by a "full_attention" layer's. Except in a model whose layers all slide (Mistral, Phi-3 with a
    `sliding_window`): every layer is "full_attention" there, its cache holding every token. With window - 1 tokens
    held, its decode step had nothing to count positions by once the window filled; the model's own sliding mask
    leaves the passed tokens out."""
    types = _hf_cache_types(config)
    return ["full_attention"] * len(types) if _all_sliding(types) else types


def _hf_cache_types(config) -> list[str]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    return list(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])


def _all_sliding(types: list[str]) -> bool:
    return bool(types) and all(t in ("sliding_attention", "chunked_attention") for t in types)


def _cache(config, layers=None):
    """The cache a graph's model runs with, laid out as `cache_layer_types` (`layers`: (key, value) per layer), or
    None: the model's own."""
    from transformers.cache_utils import DynamicCache

    if _all_sliding(_hf_cache_types(config)):
        return DynamicCache(layers)  # no config: every layer a full one
    return None if layers is None else DynamicCache(layers, config=config)


class LMPrefill(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = with_cache(self.model, _cache(self.model.config), input_ids=input_ids)
        return (out.logits, *_flat_cache(returned_cache(out)))


class LMDecode(torch.nn.Module):
    """One decode step: the new token's id and the flat past keys/values -> logits and presents. Its position is the
    past length of a full-attention layer's cache (`cache_layer_types`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past):
        config = self.model.config
        cache = _cache(config, [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        types = cache_layer_types(config)
        seen = past[2 * next((i for i, t in enumerate(types) if t == "full_attention"), 0)].shape[2]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) + seen
        out = with_cache(self.model, cache, input_ids=input_ids, position_ids=position_ids)
        return (out.logits, *_flat_cache(returned_cache(out)))


class FirstOutput(torch.nn.Module):
    """Encoders and other models: positional inputs -> the first output (logits / last hidden state)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        out = self.model(*args)
        if hasattr(out, "logits"):
            return out.logits
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class GraphSpec:
    """What one ONNX graph of a model takes and returns."""

    role: str  # prefill | decode | model
    wrapper: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple


def kv_names(n_layers: int, kind: str) -> list[str]:
    return [f"{kind}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def graph_specs(bundle, with_decode: bool = True) -> list[GraphSpec]:
    """The graphs to export for a bundle: prefill (+ decode) for decoder LMs, one graph otherwise."""
    Dim = torch.export.Dim
    batch = Dim("batch")
    model = bundle.module
    if bundle.kind == "causal-lm":
        n = model.config.num_hidden_layers
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long)
        seq = Dim("sequence", min=2)
        specs = [GraphSpec("prefill", LMPrefill(model), (ids,), ["input_ids"], ["logits"] + kv_names(n, "present"),
                           ({0: batch, 1: seq},))]
        if with_decode:
            with torch.no_grad():
                past = tuple(t.contiguous() for t in LMPrefill(model)(ids)[1:])
            # a sliding-window layer's past stops growing at window - 1 tokens: its own length
            full, sliding = Dim("past_sequence"), Dim("past_sequence_sliding")
            lengths = {"sliding_attention": sliding, "chunked_attention": sliding}
            types = cache_layer_types(model.config)
            # the step takes exactly one new token: sdpa's causal flag must be a Python bool when tracing
            specs.append(GraphSpec("decode", LMDecode(model), (ids[:, :1], past), ["input_ids"] + kv_names(n, "past"),
                                   ["logits"] + kv_names(n, "present"),
                                   ({0: batch}, tuple({0: batch, 2: lengths.get(types[j // 2], full)}
                                                      for j in range(len(past))))))
        return specs
    # a batch of 2: torch.export specializes a dimension it sees as 1 and would refuse a dynamic batch
    example = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in bundle.example_inputs)
    if not example:
        raise EdgeqError(f"export: model {bundle.reference!r} has no example inputs (return (module, inputs) from the factory)")
    if bundle.kind == "encoder":
        names = ["input_ids", "attention_mask"][: len(example)]
        seq = Dim("sequence")
        dyn = tuple({0: batch, 1: seq} for _ in example)
    else:
        names = [f"input_{i}" if i else "input" for i in range(len(example))]
        dyn = tuple({0: batch} for _ in example)
    out_name = "last_hidden_state" if bundle.kind == "encoder" else "logits" if bundle.kind == "image" else "output"
    # FirstOutput takes *args: torch.export sees one positional (the tuple), so the shapes nest once more
    return [GraphSpec("model", FirstOutput(model), example, names, [out_name], (dyn,))]


def _tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (a tied head exports as one initializer)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def _structure_key(spec: GraphSpec) -> str:
    model = spec.wrapper.model
    config = getattr(model, "config", None)
    parts = [spec.role, type(model).__module__, type(model).__qualname__, str(spec.wrapper),
             config.to_json_string() if config is not None and hasattr(config, "to_json_string") else "",
             getattr(config, "_attn_implementation", None),
             json.dumps(spec.input_names), json.dumps(spec.output_names),
             [(tuple(a.shape), str(a.dtype)) for a in torch.utils._pytree.tree_leaves(spec.args)],
             [(k, tuple(v.shape), str(v.dtype)) for k, v in spec.wrapper.state_dict().items()], _tied_groups(spec.wrapper)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _disk_key(spec: GraphSpec, key: str) -> str | None:
    """The on-disk cache key of a graph, or None when its code is not all from installed packages
    (a user's own module could change without changing anything the key sees)."""
    roots = [Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")] + [Path(__file__).resolve().parents[1]]
    files = set()
    for m in spec.wrapper.modules():
        try:
            path = Path(inspect.getsourcefile(type(m)) or "").resolve()
        except TypeError:
            return None
        if not path.is_file() or not any(path.is_relative_to(r) for r in roots):
            return None
        files.add(path)
    h = hashlib.sha256(key.encode())
    for path in sorted({*files, Path(__file__).resolve(), Path(inspect.getsourcefile(decoder_attention)).resolve()}):
        h.update(str(path).encode() + path.read_bytes())
    for dist in ("torch", "onnx", "onnxscript", "transformers"):
        try:
            h.update(f"{dist}={version(dist)}".encode())
        except PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()[:24]


def _bind(template: onnx.ModelProto, state: dict) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.CopyFrom(template)
    for init in proto.graph.initializer:
        if init.name in state:
            arr = state[init.name].detach().cpu().numpy()
            if tuple(init.dims) != arr.shape:
                raise EdgeqError(f"export: cached graph: {init.name} has shape {tuple(init.dims)}, the model {arr.shape}")
            init.raw_data = np.ascontiguousarray(arr).tobytes()
    return proto


def export_graph(spec: GraphSpec, cache: bool = True) -> tuple[onnx.ModelProto, str]:
    """The float ONNX graph of `spec` (opset 21), its initializers bound to the wrapped model's tensors,
    and where it came from: "traced", "process" (traced earlier in this process) or "disk".

    `cache=False` traces even when a cache holds the graph (the trace still refreshes both caches).
    """
    from ..cache import cache_dir
    from ..fileio import write_bytes_atomic

    state = {k: v for k, v in spec.wrapper.state_dict(keep_vars=False).items()}
    key = _structure_key(spec)
    if cache and key in _CACHE:
        return _bind(_CACHE[key], state), "process"
    disk_key = _disk_key(spec, key)
    disk = cache_dir("onnx-graphs") / f"{disk_key}.onnx" if disk_key else None
    if cache and disk is not None and disk.is_file():
        try:
            template = onnx.load_model_from_string(disk.read_bytes())
        except Exception:  # unreadable (truncated by a full disk, a protobuf change): trace it again
            template = None
        if template is not None:
            _remember(key, template)
            return _bind(template, state), "disk"
    spec.wrapper.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(spec.wrapper, spec.args, dynamo=True, opset_version=OPSET, optimize=False,
                                        input_names=spec.input_names, output_names=spec.output_names,
                                        dynamic_shapes=spec.dynamic_shapes, verbose=False)
        except Exception as exc:  # torch.export fails in many ways on user models
            raise EdgeqError(f"export: torch.onnx.export failed for the {spec.role} graph: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    proto = program.model_proto
    _cast_like_to_cast(proto.graph)
    template = onnx.ModelProto()
    template.CopyFrom(proto)
    for init in template.graph.initializer:
        if init.name in state:
            init.ClearField("raw_data")
    _remember(key, template)
    if disk is not None:
        write_bytes_atomic(disk, template.SerializeToString())
    return proto, "traced"


def _remember(key: str, template: onnx.ModelProto) -> None:
    _CACHE[key] = template
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))


def _cast_like_to_cast(graph: onnx.GraphProto) -> None:
    """Rewrite CastLike nodes whose target type the graph states as plain Casts (in place).

    The exporter writes CastLike (opset 15) for scalars it casts to another tensor's type, e.g. the
    attention scale; ONNX Runtime has no CPU kernel to constant-fold CastLike, so everything behind
    it stayed a runtime computation and the attention's MatMul and scale did not fuse. On SmolLM2's
    decode step ORT's optimizer then leaves 30 Sqrt and 34 Cast fewer and fuses 30 FusedMatMul, as
    it does for the graph ORT's own quant_pre_process writes.
    """
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            types.update({node.output[0]: a.t.data_type for a in node.attribute if a.name == "value"})
    for node in graph.node:
        if node.op_type == "CastLike" and types.get(node.input[1]):
            cast = helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=types[node.input[1]])
            node.CopyFrom(cast)


def torch_outputs(spec: GraphSpec, inputs: tuple) -> list[np.ndarray]:
    """Run the wrapper in PyTorch (the simulation when the model holds quantized layers)."""
    with torch.no_grad():
        out = spec.wrapper(*inputs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in out]
