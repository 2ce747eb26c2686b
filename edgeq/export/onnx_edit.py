"""The graph-edit basics of edgeq's ONNX quantization (onnx_quant.py, onnx_dynamic.py): one layer's
integers as numpy (`LayerQ`), where they ended up (`Rendered`), the indexes over a GraphProto and the
edits applied in one pass (`Graph`), and the weight arrays in the layout and dtype a graph stores.

Pure onnx + numpy (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
PACKED_OFFSET = 8  # a packed 4-bit table's stored value = edgeq's integer + 8 (ONNX Runtime's default zero point)
PASSIVE_OPS = ("Shape", "Size")
FUSED_ACTIVATIONS = ("Relu", "Clip")  # ORT fuses them into a QDQ Conv / Gemm before its output's QuantizeLinear


@dataclass
class LayerQ:
    """One quantized layer's tensors, as numpy (copied from a QuantLinear / QuantConv2d)."""

    name: str
    kind: str  # linear | conv2d
    q: np.ndarray  # int8 / uint8 [out, in*kh*kw]
    scale: np.ndarray  # float32 [out, n_groups]
    zero_point: np.ndarray  # int16 [out, n_groups]
    bits: int
    symmetric: bool
    group_size: int | None
    act_mode: str = "none"
    act_bits: int = 8
    act_symmetric: bool = False
    act_granularity: str = "tensor"
    act_scale: np.ndarray | None = None
    act_zero_point: np.ndarray | None = None
    weight_shape: tuple = ()
    tied: bool = False  # computes with another layer's integers (a tied LM head): rendered with that layer
    aliases: tuple = ()  # layers tied to this one: the graph may name the shared initializer after them

    @classmethod
    def from_module(cls, name: str, m) -> "LayerQ":
        d = m.decision
        a = d.activation
        return cls(name, d.kind, m.qweight.cpu().numpy(), m.scale.cpu().numpy(), m.zero_point.cpu().numpy(),
                   d.weight.bits, d.weight.symmetric, d.group_size, a.mode, a.bits, a.symmetric, a.granularity,
                   m.act_scale.cpu().numpy() if a.mode == "static" else None,
                   m.act_zero_point.cpu().numpy() if a.mode == "static" else None, tuple(d.shape))

    @classmethod
    def from_model(cls, layers: dict) -> list["LayerQ"]:
        """Every quantized layer of a model, tied heads marked and listed as aliases of their source."""
        from ..quantize.modules import TIED_METHOD
        from ..quantize.qmodel import tied_source

        out = {n: cls.from_module(n, m) for n, m in layers.items()}
        for n, m in layers.items():
            if m.decision.method == TIED_METHOD:
                out[n].tied = True
                out[tied_source(layers, m)].aliases += (n,)
        return list(out.values())


@dataclass
class Rendered:
    """Where a layer's integers ended up in the graph (for read-back and the metadata)."""

    layer: str
    op: str  # DequantizeLinear | MatMulInteger | Gather | GatherBlockQuantized | MatMulNBits (packed 4-bit: no zero point tensor)
    weight: str
    scale: str
    zero_point: str
    layout: str  # oi ([out, in...]) | io (transposed, [in, out])
    container: str  # int4 | uint4 | int8 | uint8
    blocked: bool
    activation: str
    offset: int = 0  # stored integer = edgeq's integer + offset (uint8 re-encoding of int8 weights)
    nodes: list = field(default_factory=list)
    # rows after the layer's own in the stored [in, out] integers, holding its activation zero points' term
    # (onnx_dynamic.zero_point_rows); read-back checks them and compares the rows before them
    zero_point_rows: int = 0
    # a static Conv's / Gemm's bias stored as int32 on fp32(input scale * weight scale) (onnx_quant.int32_biases): the
    # largest distance from the float bias, at most half a step; None where the layer has no such bias
    bias_error: float | None = None
    # a folded norm's dead channels: zero integers on a scale their int32 bias fits (batchnorm.BnFold.dead); the layer
    # then reads back bitwise against those, and is not exact
    rescaled_channels: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "nodes"}


def container(bits: int, symmetric: bool) -> tuple[str, int, type]:
    if bits <= 4:
        return ("int4", TensorProto.INT4, ml_dtypes.int4) if symmetric else ("uint4", TensorProto.UINT4, ml_dtypes.uint4)
    return ("int8", TensorProto.INT8, np.int8) if symmetric else ("uint8", TensorProto.UINT8, np.uint8)


class Graph:
    """Indexes over a GraphProto, and the edits to apply in one pass at the end."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for i, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, i))
        self.before: dict[int, list] = {}  # id(node) -> nodes to emit before it
        self.after: dict[int, list] = {}  # id(node) -> nodes to emit after it
        self.producer = {o: node for node in graph.node for o in node.output}
        self.input_quant: dict[tuple, tuple] = {}  # (tensor, grid) -> outputs of its one quantization, shared by the layers reading it (dynamic or static)
        self.replace: dict[int, list] = {}  # id(node) -> nodes to emit instead
        self.head: list = []  # weight DQ nodes (inputs are all initializers)
        self.new_inits: list = []
        self.drop_inits: set[str] = set()
        self.names = {n for node in graph.node for n in node.output} | set(self.inits)

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_init(self, array: np.ndarray, base: str) -> str:
        name = self.unique(base)
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def dynamic_quant(self, x: str, layer: str) -> tuple[tuple, str | None]:
        """One DynamicQuantizeLinear per tensor, shared by every layer reading it (as ORT's quantizer does)."""
        if (x, "tensor") in self.input_quant:
            return self.input_quant[(x, "tensor")], None
        outs = tuple(self.unique(f"{x}_{s}") for s in ("quantized", "scale", "zero_point"))
        name = self.unique(f"{layer}/input_dynamic_q")
        self.emit_after_producer(x, [helper.make_node("DynamicQuantizeLinear", [x], list(outs), name=name)])
        self.input_quant[(x, "tensor")] = outs
        return outs, name

    def emit_after_producer(self, x: str, nodes: list) -> None:
        """Place `nodes` right after the node producing `x` (at the head for a graph input)."""
        producer = self.producer.get(x)
        if producer is None:
            self.head.extend(nodes)
        else:
            self.after.setdefault(id(producer), []).extend(nodes)

    def commit(self) -> None:
        nodes = list(self.head)
        for node in self.graph.node:
            nodes += self.before.get(id(node), [])
            nodes += self.replace.get(id(node), [node])
            nodes += self.after.get(id(node), [])
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        keep = [t for t in self.graph.initializer if t.name not in self.drop_inits]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep + self.new_inits)


VALUE_KEEPING = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")  # a constant's values pass through


def constant_value(g: Graph, name: str) -> np.ndarray | None:
    """The values of a constant tensor: an initializer, a Constant node's output, or either through value-keeping ops
    (the exporter writes a Pad's and a ReduceMean's constants as Reshape(Constant)); else None."""
    if name in g.inits:
        return numpy_helper.to_array(g.inits[name])
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant":
        value = next((a for a in node.attribute if a.name == "value"), None)
        return numpy_helper.to_array(value.t) if value is not None else None
    if node is not None and node.op_type in VALUE_KEEPING and node.input:
        return constant_value(g, node.input[0])
    return None


def dequantized_by(g: Graph, name: str, constant: bool):
    """The DequantizeLinear producing `name` from a constant (`constant`: a weight) or from a tensor (an activation's
    grid), else None; through a zero-padding Pad for an activation (onnx_quant._zero_pad puts it after the DQ)."""
    p = g.producer.get(name)
    if p is not None and p.op_type == "Pad" and not constant:
        p = g.producer.get(p.input[0])
    return p if p is not None and p.op_type == "DequantizeLinear" and (p.input[0] in g.inits) == constant else None


def static_qdq_layers(g: Graph):
    """(node, its input's DequantizeLinear, its weight's DequantizeLinear) of each Conv / Gemm reading a static grid."""
    for node in g.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) >= 2:
            x, w = dequantized_by(g, node.input[0], False), dequantized_by(g, node.input[1], True)
            if x is not None and w is not None:
                yield node, x, w


def output_readers(g: Graph, node, graph_outputs: set[str]) -> tuple[str, list]:
    """A Conv's / Gemm's output after the Relu / Clip that is its only reader (ONNX Runtime fuses those into the
    integer kernel, before the output's QuantizeLinear), and the nodes reading that."""
    t = node.output[0]
    while (len(g.consumers.get(t, [])) == 1 and g.consumers[t][0][0].op_type in FUSED_ACTIVATIONS
           and t not in graph_outputs):
        t = g.consumers[t][0][0].output[0]
    return t, [r for r, _ in g.consumers.get(t, [])]


def transpose_consumers(g: Graph, name: str) -> list | None:
    """The Transpose nodes that are a weight's only consumers (2-D, perm [1, 0]), else None."""
    cons = g.consumers.get(name, [])
    if not cons:
        return None
    for node, _ in cons:
        if node.op_type != "Transpose":
            return None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            return None
    return [node for node, _ in cons]


def weight_arrays(lq: LayerQ, layout: str, bits_container: int, u8: bool = False):
    """Integers, scale and zero point in the layout and dtype the graph stores (and the offset added)."""
    offset = 128 if u8 and bits_container > 4 and lq.symmetric else 0
    name, _, np_type = container(bits_container, lq.symmetric and not offset)
    q = lq.q.astype(np.int16) + offset
    zp = lq.zero_point.astype(np.int16) + offset
    scale = lq.scale.astype(np.float32)
    blocked = lq.group_size is not None
    if lq.kind == "conv2d":
        q = q.reshape(lq.weight_shape)
    if layout == "io":
        q = q.T
        scale, zp = (scale.T, zp.T) if blocked else (scale[:, 0], zp[:, 0])
    elif not blocked:
        scale, zp = scale[:, 0], zp[:, 0]
    return name, np.ascontiguousarray(q.astype(np_type)), np.ascontiguousarray(scale), np.ascontiguousarray(zp.astype(np_type)), blocked, offset


def fix_batch_one(model: onnx.ModelProto) -> None:
    """Fix a graph's symbolic batch dimension (dim 0 of its first input) to 1 everywhere it is named,
    so ONNX Runtime refuses any other batch with a shape error instead of computing other grids."""
    param = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not param:
        return
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param == param:
                d.ClearField("dim_param")
                d.dim_value = 1
