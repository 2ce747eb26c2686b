"""Read ONNX files on a board without the `onnx` package: vet external-data references, list a graph's nodes.

ONNX tensors may keep their bytes in another file named by a `location` string. A hostile model
could name `../../etc/shadow`, an absolute path or a symlink and have the runtime read it. This
module walks the protobuf wire format just deep enough to collect every `location` (graph
initializers, sparse initializers, node attributes, subgraphs and functions) and refuses any
that is not a plain path inside the job directory, BEFORE the runtime ever opens the model.
It never executes or imports anything from the model.

The same walk lists the main graph's nodes (`graph_nodes`), which `kernel_account` reads in the
graph ONNX Runtime optimized on the board: which ops it fused into integer kernels, and which
weight ops it left float on dequantized tensors.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import EdgeqError

_MAX_DEPTH = 64

# field numbers from onnx.proto
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTR, _NODE_DOMAIN = 1, 2, 4, 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNC_NODE = 7
_TENSOR_EXTERNAL, _TENSOR_LOCATION_KIND = 13, 14


class MalformedModel(EdgeqError):
    """The bytes are not a well-formed ONNX protobuf."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedModel("ONNX: truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) for one message; length-delimited values are (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise MalformedModel("ONNX: field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:
            raise MalformedModel(f"ONNX: unsupported wire type {wire}")
        if pos > end:
            raise MalformedModel("ONNX: a field runs past the end of its message")
        yield field, wire, value


def _sub(fields, number: int):
    for f, w, v in fields:
        if f == number and w == 2:
            yield v


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _tensor(buf, span, out: list[str]) -> None:
    location = None
    is_external = False
    for f, w, v in _fields(buf, *span):
        if f == _TENSOR_LOCATION_KIND and w == 0:
            is_external = v == 1
        elif f == _TENSOR_EXTERNAL and w == 2:
            key = value = None
            for ef, ew, ev in _fields(buf, *v):
                if ew == 2 and ef in (1, 2):
                    text = _text(buf, ev)
                    key, value = (text, value) if ef == 1 else (key, text)
            if key == "location":
                location = value
    if location is not None or is_external:
        out.append(location if location is not None else "")


def _sparse(buf, span, out, depth):
    for f, w, v in _fields(buf, *span):
        if w == 2 and f in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(buf, v, out)


def _graph(buf, span, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise MalformedModel("ONNX: subgraphs nested too deeply")
    for f, w, v in _fields(buf, *span):
        if w != 2:
            continue
        if f == _GRAPH_INIT:
            _tensor(buf, v, out)
        elif f == _GRAPH_SPARSE_INIT:
            _sparse(buf, v, out, depth)
        elif f == _GRAPH_NODE:
            _node(buf, v, out, depth)


def _node(buf, span, out, depth):
    for attr in _sub(_fields(buf, *span), _NODE_ATTR):
        for f, w, v in _fields(buf, *attr):
            if w != 2:
                continue
            if f in (_ATTR_T, _ATTR_TENSORS):
                _tensor(buf, v, out)
            elif f in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, v, out, depth + 1)
            elif f in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(buf, v, out, depth)


@contextlib.contextmanager
def _mapped(path: str | os.PathLike) -> Iterator[tuple[mmap.mmap, int]]:
    """An ONNX file's bytes, memory-mapped read-only, and their count (an empty file is malformed)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise MalformedModel("ONNX: empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf, size


def external_locations(path: str | os.PathLike) -> list[str]:
    """Every external-data `location` named in an ONNX file ('' for external with no location)."""
    out: list[str] = []
    with _mapped(path) as (buf, size):
        saw_graph = False
        for field, wire, value in _fields(buf, 0, size):
            if field == _MODEL_GRAPH and wire == 2:
                saw_graph = True
                _graph(buf, value, out, 0)
            elif field == _MODEL_FUNCTIONS and wire == 2:
                for node in _sub(_fields(buf, *value), _FUNC_NODE):
                    _node(buf, node, out, 1)
        if not saw_graph:
            raise MalformedModel("ONNX: no graph in the model")
    return out


def check_external_data(model_path: str | os.PathLike, job_dir: str | os.PathLike) -> list[str]:
    """Refuse (EdgeqError) any external-data location outside `job_dir`; return the locations.

    Refused: empty, absolute, containing `..`, a symlink anywhere on the path, resolving outside
    the job directory, or missing.
    """
    job_dir = Path(job_dir).resolve()
    locations = external_locations(model_path)
    for loc in locations:
        if not loc or "\x00" in loc:
            raise EdgeqError("ONNX external data: a tensor is external but names no location")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise EdgeqError(f"ONNX external data: absolute location {loc!r} is refused")
        parts = Path(loc.replace("\\", "/")).parts
        if ".." in parts:
            raise EdgeqError(f"ONNX external data: location {loc!r} leaves the job directory")
        current = Path(model_path).resolve().parent
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise EdgeqError(f"ONNX external data: location {loc!r} goes through a symlink")
        target = current.resolve()
        if job_dir not in target.parents:
            raise EdgeqError(f"ONNX external data: location {loc!r} resolves outside the job directory")
        if not target.is_file():
            raise EdgeqError(f"ONNX external data: location {loc!r} was not uploaded with the model")
    return locations


class Node(NamedTuple):
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_nodes(path: str | os.PathLike) -> list[Node]:
    """The nodes of an ONNX file's main graph, in order (subgraphs and functions not opened)."""
    nodes: list[Node] = []
    with _mapped(path) as (buf, size):
        graphs = list(_sub(_fields(buf, 0, size), _MODEL_GRAPH))
        if not graphs:
            raise MalformedModel("ONNX: no graph in the model")
        for span in _sub(_fields(buf, *graphs[-1]), _GRAPH_NODE):
            fields = {_NODE_INPUT: [], _NODE_OUTPUT: [], _NODE_OP_TYPE: [], _NODE_DOMAIN: []}
            for f, w, v in _fields(buf, *span):
                if w == 2 and f in fields:
                    fields[f].append(_text(buf, v))
            nodes.append(Node("".join(fields[_NODE_OP_TYPE][-1:]), "".join(fields[_NODE_DOMAIN][-1:]),
                              tuple(fields[_NODE_INPUT]), tuple(fields[_NODE_OUTPUT])))
    return nodes


# ONNX Runtime's float kernels for the ops that carry weights (its fusions included; nchwc's Conv is op type Conv)
FLOAT_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"})
# ONNX Runtime's integer kernels (CPU): what its QDQ fusions and the dynamic / 4-bit quantizers' ops run as
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QAttention", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "GatherBlockQuantized", "QEmbedLayerNormalization"})
# ops that move or reshape a tensor without changing its values: a DequantizeLinear's output stays dequantized
_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def kernel_account(nodes: list[Node]) -> dict:
    """What an ONNX Runtime session runs, from its optimized graph: `nodes`, `ops` (op type -> count), `integer` (the
    ops of `ops` that are integer kernels) and `float_on_dequantized`: the weight ops left on float kernels with an
    input a DequantizeLinear makes, directly or through ops that only move values. That is a quantized layer ONNX
    Runtime did not fuse into an integer kernel (QLinearConv, QGemm, MatMulInteger...): it dequantizes on every run,
    slower than float. A weight-only file's layers are all such by design."""
    made_by = {out: node for node in nodes for out in node.outputs}

    def dequantized(name: str) -> bool:
        seen = 0
        node = made_by.get(name)
        while node is not None and node.op_type in _PASS_THROUGH and node.inputs and seen < 64:
            node, seen = made_by.get(node.inputs[0]), seen + 1
        return node is not None and node.op_type == "DequantizeLinear"

    ops = Counter(n.op_type for n in nodes)
    left = Counter(n.op_type for n in nodes if n.op_type in FLOAT_WEIGHT_OPS and any(map(dequantized, n.inputs)))
    return {"nodes": len(nodes), "ops": dict(sorted(ops.items())),
            "integer": {op: n for op, n in sorted(ops.items()) if op in INTEGER_OPS},
            "float_on_dequantized": dict(sorted(left.items()))}
