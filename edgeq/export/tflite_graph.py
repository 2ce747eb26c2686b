"""The float TFLite graph an export starts from: PyTorch -> litert-torch -> labelled flatbuffer.

A quantized model's float rendering (`tflite_render`: plain float layers holding its dequantized
weights `(q - zp) * scale`, never its fake-quant simulation) is converted once with litert-torch, and
each edgeq layer is found in the flatbuffer by the exact bytes of its weight. Its weight tensor is renamed
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
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..console import native_chatter_dropped
from ..errors import EdgeqError
from ..models.hf import eager_attention, litert_attention
from ..quantize.modules import quant_layers
from .tflite_decode import dynamic_slots, resize_check
from .tflite_flatbuffer import op_names, read_model, schema, write_model
from .tflite_render import example_inputs, float_rendering, graph_module, tflite_weight, unused_layers

WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "EMBEDDING_LOOKUP")  # input 1: weight / table
GRAPH_VERSION = 17  # bump when a change outside `GRAPH_SOURCES` makes cached graphs wrong


def op_code(model_t, codes: list[str], name: str) -> int:
    """The index of builtin op `name` in `model_t`'s operator codes, added (version 1) if the file has none; `codes` is
    `op_names(model_t)`, kept in step."""
    if name not in codes:
        s = schema()
        code = s.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = getattr(s.BuiltinOperator, name)
        code.version = 1
        model_t.operatorCodes.append(code)
        codes.append(name)
    return codes.index(name)


def int32_constant(model_t, sg, values: list[int], name: bytes) -> int:
    """A new constant int32 vector tensor in subgraph `sg` (its own buffer); returns its index."""
    s = schema()
    buf = s.BufferT()
    buf.data = np.frombuffer(np.array(values, dtype=np.int32).tobytes(), dtype=np.uint8)
    model_t.buffers.append(buf)
    t = s.TensorT()
    t.shape, t.type, t.buffer, t.name = np.array([len(values)], dtype=np.int32), s.TensorType.INT32, len(model_t.buffers) - 1, name
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def weight_ops(model_t):
    """(subgraph, op, op name) for every op with a weight input, in graph order."""
    codes = op_names(model_t)
    for sg in model_t.subgraphs:
        for op in sg.operators:
            name = codes[op.opcodeIndex]
            if name in WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
                yield sg, op, name


def merge_duplicate_ops(model_t) -> None:
    """Compute each weight op once: an op repeating an earlier one of its subgraph (same op, inputs and options but
    `keepNumDims`, so the same values) becomes a RESHAPE of the earlier op's output to its own output's shape.

    The converter can emit one layer twice: ELECTRA's embedding projection was a FULLY_CONNECTED with a 2-D output
    for the attention inputs and another with a 3-D one for the residual. Only one of them got the layer's label, so
    the other kept the float weight: that path ran unquantized, the file carried a float copy of the weight, and the
    read-back (which checks the labelled op) could not see it.
    """
    s = schema()
    codes = op_names(model_t)
    for sg in model_t.subgraphs:
        seen = {}
        for i, op in enumerate(sg.operators):
            if codes[op.opcodeIndex] not in WEIGHT_OPS or len(op.outputs) != 1:
                continue
            opts = {k: v for k, v in vars(op.builtinOptions).items() if k != "keepNumDims"} if op.builtinOptions else {}
            key = (op.opcodeIndex, tuple(int(x) for x in op.inputs), op.builtinOptionsType, repr(sorted(opts.items())))
            first = seen.setdefault(key, op)
            out = sg.tensors[op.outputs[0]]
            dims = [int(d) for d in (out.shapeSignature if out.shapeSignature is not None and len(out.shapeSignature) else out.shape)]
            if first is op or sum(d < 0 for d in dims) > 1:  # RESHAPE takes one unknown dimension
                continue
            reshape = s.OperatorT()
            shape = int32_constant(model_t, sg, dims, out.name + b"/shape")
            reshape.opcodeIndex = op_code(model_t, codes, "RESHAPE")
            reshape.inputs, reshape.outputs = np.array([first.outputs[0], shape], dtype=np.int32), op.outputs
            sg.operators[i] = reshape


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
    table are one tensor in the converted graph: it keeps the first layer's label (`layer_ops`). An op the converter
    emitted twice is merged into one first (`merge_duplicate_ops`).
    """
    kinds = kinds or {}
    merge_duplicate_ops(model_t)
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
                         "e.g. by folding a BatchNorm or a constant multiply of its output into it; its integers cannot be "
                         "carried exactly. "
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


# edgeq's modules a float graph is traced from besides the classes of the model's own modules (`_code_digest` adds
# those, edgeq's quantized layers among them)
GRAPH_SOURCES = ("export/tflite_graph.py", "export/tflite_render.py", "export/batchnorm.py", "export/tflite_decode.py",
                 "export/tflite_hfdecode.py", "export/tflite_runtime.py", "models/hf.py")


def _code_digest(model: torch.nn.Module) -> str:
    """Hash of the source the graph comes from: edgeq's rendering (`GRAPH_SOURCES`) and the file of every module
    class in `model` (a Hugging Face modeling file changes with the installed transformers)."""
    import inspect

    root = Path(__file__).resolve().parents[1]
    files = {root / f for f in GRAPH_SOURCES}
    for m in model.modules():
        try:
            files.add(Path(inspect.getsourcefile(type(m)) or "").resolve())
        except TypeError:  # a class without a source file (built in)
            continue
    h = hashlib.sha256()
    for path in sorted(f for f in files if f.is_file()):
        h.update(str(path).encode() + path.read_bytes())
    return h.hexdigest()


def graph_key(bundle, model: torch.nn.Module, seq_len: int, folds: dict | None = None, cache_len: int | None = None) -> str:
    """The cache key of a float graph: what the traced graph depends on besides its quantized layers' weights (which
    `set_weights` puts in): the layers, the config, the other float tensors, the code, the inputs, the versions. Before
    the config and code were in it, a model saved again with another `sliding_window` (same path, same weights) got
    the old graph: a Mistral's INT4 file computed full attention against a simulation with a window of 16 (cosine
    0.80, caught by the parity check)."""
    layers = {n: [type(m).__name__, list(m.decision.shape)] for n, m in quant_layers(model).items()}
    ex = [list(t.shape) + [str(t.dtype)] for t in example_inputs(bundle, seq_len)]
    config = getattr(model, "config", None)
    from importlib.metadata import version

    text = json.dumps([GRAPH_VERSION, sorted(folds or {}), bundle.reference, bundle.kind, layers, ex, _float_digest(model),
                       config.to_json_string() if hasattr(config, "to_json_string") else None,
                       _code_digest(model), torch.__version__, version("litert-torch"), cache_len], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def float_graph(bundle, model: torch.nn.Module, seq_len: int, cache: bool = True, folds: dict | None = None,
                cache_len: int | None = None) -> tuple[bytes, dict[str, str], float, str | None]:
    """The labelled float TFLite graph of `model` with its dequantized weights (BatchNorms in `folds` folded),
    with a `decode` signature over a `cache_len`-slot KV cache when `cache_len` is given, its slot count made a
    run-time choice (`tflite_decode.dynamic_slots`).

    Returns (flatbuffer bytes, layer -> op name, conversion seconds (0 when cached), why the decode signature's
    slots stay fixed (None: they do not, or there is no decode signature)).
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
        meta = read_json(index)
        return write_model(model_t), meta["layers"], 0.0, meta["static_slots"]
    t0 = time.perf_counter()
    buf = convert(bundle, model, seq_len, folds, cache_len)
    seconds = time.perf_counter() - t0

    def labelled(model_t) -> tuple[bytes, dict[str, str]]:
        found = label_layers(model_t, weights, {n: m.decision.kind for n, m in layers.items()},
                             unused=lambda: unused_layers(bundle, model, seq_len))
        return write_model(model_t), found

    model_t = read_model(buf)
    static_slots = dynamic_slots(model_t, cache_len) if cache_len else None
    out, found = labelled(model_t)
    if cache_len and static_slots is None:
        static_slots = resize_check(out, cache_len)
        if static_slots is not None:  # as converted: the declared slots only
            out, found = labelled(read_model(buf))
    if cache:
        write_bytes_atomic(cached, out)
        write_json_atomic(index, {"reference": bundle.reference, "seq_len": seq_len, "cache_len": cache_len, "layers": found,
                                  "static_slots": static_slots})
    return out, found, seconds, static_slots


class _NotForEdgeqUsers(logging.Filter):
    """litert-torch warns on the root logger that its files take int32 / float32 where the model took int64: edgeq
    feeds them so, and FILE.json's `inputs` give each input's dtype."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "enable_x64=False downcasts" not in str(record.msg)


@contextlib.contextmanager
def _converter_output():
    """A conversion without the messages that concern litert-torch's callers, not edgeq's users: the int32 inputs
    (`_NotForEdgeqUsers`) and a deprecation inside torch.export (torch 2.13's pytree, `isinstance(treespec,
    LeafSpec)`, five times per conversion)."""
    root, dropped = logging.getLogger(), _NotForEdgeqUsers()
    root.addFilter(dropped)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            yield
    finally:
        root.removeFilter(dropped)


def convert(bundle, model: torch.nn.Module, seq_len: int, folds: dict | None = None, cache_len: int | None = None) -> bytes:
    """litert-torch conversion of the float rendering of `model`: a `serving_default` signature, and with
    `cache_len` one that also returns the KV caches (`tflite_decode.KVPrefill`) and a `decode` signature
    (`tflite_decode.decode_module`: KVDecode or HFDecode) reading the same weights."""
    import tempfile

    with native_chatter_dropped():  # its converter's native libraries announce oneDNN on loading
        import litert_torch

    # encoders' and vision transformers' sdpa would be lowered with queries and keys scaled by sqrt(scale) each, folded
    # into their weights (`eager_attention`)
    attention = litert_attention(model) if bundle.kind == "causal-lm" else eager_attention(model, bundle.kind in ("encoder", "image"))
    with float_rendering(model, folds), attention, torch.no_grad(), _converter_output():
        module = graph_module(bundle, model)
        try:
            if cache_len:
                from .tflite_decode import KVPrefill, decode_module, example_inputs as decode_inputs

                edge = (litert_torch.signature("serving_default", KVPrefill(model, cache_len).eval(), example_inputs(bundle, seq_len))
                        .signature("decode", decode_module(model, cache_len), decode_inputs(model, cache_len)).convert())
            else:
                edge = litert_torch.convert(module, example_inputs(bundle, seq_len))
        except Exception as exc:  # the converter fails in many ways on unsupported ops
            raise EdgeqError(f"tflite: litert-torch cannot convert {bundle.reference!r}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        with tempfile.TemporaryDirectory(prefix="edgeq-tflite-") as tmp:
            path = Path(tmp) / "float.tflite"
            edge.export(str(path))
            return path.read_bytes()
