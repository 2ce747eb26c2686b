"""Graph surgery that puts edgeq's integers into a float ONNX graph (onnx_readback.py checks them).

Pure onnx + numpy (no torch). For each quantized layer the float weight initializer
`model.<layer>.weight` is replaced by integers, scales and zero points:
- weight-only and static layers: `DequantizeLinear(int weight, scale, zero point)`; when the
  weight feeds a `Transpose` (how the exporter writes `nn.Linear` as MatMul), the integers are
  stored transposed ([in, out]) and the Transpose disappears, so ONNX Runtime sees DQ -> MatMul
  and fuses integer kernels (MatMulNBits for 4-bit blocks). Per-channel: axis = the output axis;
  groups: opset-21 blocked DQ along the input axis. 2..4-bit values use INT4/UINT4 containers.
- static activations: `QuantizeLinear -> DequantizeLinear` (uint8, the layer's own grid) on the
  compute node's input.
- dynamic per-tensor activations on a MatMul: the structure ORT's own `quantize_dynamic` writes
  (DynamicQuantizeLinear, MatMulInteger, Cast, Mul by x_scale * w_scale), which ORT fuses into
  DynamicQuantizeMatMul; on Conv/Gemm or grouped weights: DynamicQuantizeLinear -> DequantizeLinear
  on the input (same numbers, float kernel).
- dynamic per-token activations on a MatMul: each row's scale (and zero point) from float ops, the
  integers from one QuantizeLinear (a block per row, or for symmetric grids x / scale on scale 1).
  In a graph whose every layer input is one row (a batch-1 decode step, `single_row`), the token's
  grid is the tensor's, so these layers are rendered like per-tensor ones (asymmetric 8-bit: ORT's
  own DynamicQuantizeMatMul structure). Symmetric grids are shifted into uint8 (+128, one scalar
  zero point) and the layer is MatMulInteger, Cast and Mul by x_scale * w_scale,
  which ORT fuses into MatMulIntegerToFloat; asymmetric rows keep their zero points: MatMulInteger
  runs without them (ORT's takes only a scalar activation zero point), fused the same way, and
  `(s_x zp_x) * (s_w colsum(w - zp_w))` is subtracted after it.
Dequantization is `(q - zp) * scale` everywhere, exactly the simulation's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeqError

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
PASSIVE_OPS = ("Shape", "Size")


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
    op: str  # DequantizeLinear | MatMulInteger
    weight: str
    scale: str
    zero_point: str
    layout: str  # oi ([out, in...]) | io (transposed, [in, out])
    container: str  # int4 | uint4 | int8 | uint8
    blocked: bool
    activation: str
    offset: int = 0  # stored integer = edgeq's integer + offset (uint8 re-encoding of int8 weights)
    nodes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "nodes"}


def container(bits: int, symmetric: bool) -> tuple[str, int, type]:
    if bits <= 4:
        return ("int4", TensorProto.INT4, ml_dtypes.int4) if symmetric else ("uint4", TensorProto.UINT4, ml_dtypes.uint4)
    return ("int8", TensorProto.INT8, np.int8) if symmetric else ("uint8", TensorProto.UINT8, np.uint8)


class _Graph:
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
        self.dynamic: dict[tuple, tuple] = {}  # (tensor, grid) -> outputs of its one dynamic quantization
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
        if (x, "tensor") in self.dynamic:
            return self.dynamic[(x, "tensor")], None
        outs = tuple(self.unique(f"{x}_{s}") for s in ("quantized", "scale", "zero_point"))
        name = self.unique(f"{layer}/input_dynamic_q")
        self.emit_after_producer(x, [helper.make_node("DynamicQuantizeLinear", [x], list(outs), name=name)])
        self.dynamic[(x, "tensor")] = outs
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


def _transpose_consumers(g: _Graph, name: str) -> list | None:
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


def quantize_graph(model: onnx.ModelProto, layers: list[LayerQ], prefix: str = "model",
                   int8_weights: str = "int8", single_row: bool = False) -> tuple[list[Rendered], list[str]]:
    """Replace each layer's float weight in `model` (in place).

    Returns where the integers went, and the layers absent from this graph (the exporter drops
    layers whose output nothing uses, e.g. BERT's pooler when the graph returns hidden states).
    `int8_weights="uint8"` stores symmetric 5..8-bit weights as uint8 with zero point 128 (the same
    real values): ONNX Runtime's u8s8 integer kernels saturate int16 pair sums on x86 CPUs without
    VNNI (AVX2 only), its u8u8 kernels do not. `single_row=True` promises that every quantized
    layer's input holds one row (the caller fixes the graph's batch to 1 for a one-token decode step):
    per-token grids are then rendered as per-tensor ones, the same numbers in fewer operators.
    """
    g = _Graph(model.graph)
    g.u8 = int8_weights == "uint8"
    if single_row:
        layers = [replace(lq, act_granularity="tensor") if lq.act_granularity == "token" else lq for lq in layers]
    rendered, absent = [], []
    for lq in layers:
        if lq.tied:
            continue  # rendered with the layer it shares its integers with
        wname = next((w for w in (f"{prefix}.{n}.weight" for n in (lq.name, *lq.aliases)) if w in g.inits), None)
        if wname is None:
            absent.append(lq.name)
            continue
        rendered.append(_render_embedding(g, lq, wname) if lq.kind == "embedding" else _render_layer(g, lq, wname))
    if layers and len(absent) == len(layers):
        raise EdgeqError(f"export: none of the {len(layers)} quantized layers' weights is in the ONNX graph "
                         f"(looked for initializers named like {prefix}.{layers[0].name}.weight)")
    _fold_float_transposes(g)
    g.commit()
    return rendered, absent


def _fold_float_transposes(g: _Graph) -> None:
    """Store float weights that only feed Transpose already transposed (ORT's own quantizers need MatMul(x, initializer))."""
    for name, init in list(g.inits.items()):
        if name in g.drop_inits or len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        transposes = _transpose_consumers(g, name)
        if not transposes or any(id(t) in g.replace for t in transposes):
            continue
        arr = np.ascontiguousarray(numpy_helper.to_array(init).T)
        tname = g.unique(name + "_T")
        for t in transposes:
            g.replace[id(t)] = []
            for node, idx in g.consumers.get(t.output[0], []):
                node.input[idx] = tname
        g.drop_inits.add(name)
        g.new_inits.append(numpy_helper.from_array(arr, tname))


def _render_layer(g: _Graph, lq: LayerQ, wname: str) -> Rendered:
    transposes = _transpose_consumers(g, wname) if lq.kind == "linear" else None
    layout = "io" if transposes else "oi"
    g.drop_inits.add(wname)
    if transposes:
        outputs = [t.output[0] for t in transposes]
        for t in transposes:
            g.replace[id(t)] = []
        compute = [c for out in outputs for c in g.consumers.get(out, [])]
    else:
        outputs = [wname]
        compute = list(g.consumers.get(wname, []))
    # Shape/Size only look at the weight's shape (TF-style "same" padding computes it): they read the DQ output
    passive = [(n, i) for n, i in compute if n.op_type in PASSIVE_OPS]
    compute = [(n, i) for n, i in compute if n.op_type not in PASSIVE_OPS]
    if not compute or any(node.op_type not in COMPUTE_OPS or idx != 1 for node, idx in compute):
        ops = sorted({f"{n.op_type}[{i}]" for n, i in compute + passive})
        raise EdgeqError(f"export: layer {lq.name!r}: its weight feeds {ops}, not MatMul/Gemm/Conv; cannot place its integers")
    if lq.act_mode == "dynamic" and lq.act_granularity not in ("tensor", "token"):
        raise EdgeqError(f"export: layer {lq.name!r} has {lq.act_granularity}-wise dynamic activations; ONNX renders "
                         "per-tensor and per-token dynamic activations only")
    if lq.act_mode == "static" and (lq.act_bits != 8 or lq.act_symmetric):
        raise EdgeqError(f"export: layer {lq.name!r}: ONNX static activations must be 8-bit asymmetric (uint8), "
                         f"got {lq.act_bits}-bit {'symmetric' if lq.act_symmetric else 'asymmetric'}")
    matmul_integer = (lq.act_mode == "dynamic" and lq.act_bits == 8 and layout == "io"
                      and lq.group_size is None and lq.bits <= 8 and not passive
                      and all(n.op_type == "MatMul" for n, _ in compute))
    if matmul_integer and lq.act_symmetric:
        return _render_matmul_integer_symmetric(g, lq, compute)
    if matmul_integer and lq.act_granularity == "token":
        return _render_matmul_integer_token(g, lq, compute)
    if matmul_integer:
        return _render_matmul_integer(g, lq, compute, outputs)
    return _render_dq(g, lq, layout, outputs, compute, passive)


def _weight_arrays(lq: LayerQ, layout: str, bits_container: int, u8: bool = False):
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


def _render_dq(g: _Graph, lq: LayerQ, layout: str, outputs: list[str], compute: list, passive: list = ()) -> Rendered:
    ctype, q, scale, zp, blocked, offset = _weight_arrays(lq, layout, lq.bits, g.u8 and lq.act_mode != "none")
    qn = g.add_init(q, f"{lq.name}.qweight")
    sn = g.add_init(scale, f"{lq.name}.scale")
    zn = g.add_init(zp, f"{lq.name}.zero_point")
    axis = (1 if blocked else 0) if layout == "oi" else (0 if blocked else 1)
    attrs = {"axis": axis}
    if blocked:
        attrs["block_size"] = lq.group_size
    w = g.unique(f"{lq.name}.weight_dq")
    dq = helper.make_node("DequantizeLinear", [qn, sn, zn], [w], name=g.unique(f"{lq.name}/weight_dq"), **attrs)
    g.head.append(dq)
    nodes = [dq.name]
    for node, idx in [*compute, *passive]:
        node.input[idx] = w
    if lq.act_mode == "static":
        asn = g.add_init(lq.act_scale.reshape(()).astype(np.float32), f"{lq.name}.act_scale")
        azn = g.add_init(lq.act_zero_point.reshape(()).astype(np.uint8), f"{lq.name}.act_zero_point")
        for node, _ in compute:
            xq, xdq = g.unique(f"{lq.name}.input_q"), g.unique(f"{lq.name}.input_dq")
            qn_, dqn_ = g.unique(f"{lq.name}/input_q"), g.unique(f"{lq.name}/input_dq")
            g.before.setdefault(id(node), []).extend([
                helper.make_node("QuantizeLinear", [node.input[0], asn, azn], [xq], name=qn_),
                helper.make_node("DequantizeLinear", [xq, asn, azn], [xdq], name=dqn_)])
            node.input[0] = xdq
            nodes += [qn_, dqn_]
    elif lq.act_mode == "dynamic" and (lq.act_granularity == "token" or lq.act_bits != 8 or lq.act_symmetric):
        for node, _ in compute:
            xdq, made = _per_token_fake_quant(g, node.input[0], lq, per_token=lq.act_granularity == "token")
            g.before.setdefault(id(node), []).extend(made)
            node.input[0] = xdq
            nodes += [n.name for n in made]
    elif lq.act_mode == "dynamic":
        for node, _ in compute:
            (xq, xs, xz), qn_ = g.dynamic_quant(node.input[0], lq.name)
            xdq, dqn_ = g.unique(f"{lq.name}.input_dq"), g.unique(f"{lq.name}/input_dq")
            g.before.setdefault(id(node), []).append(helper.make_node("DequantizeLinear", [xq, xs, xz], [xdq], name=dqn_))
            node.input[0] = xdq
            nodes += [n for n in (qn_, dqn_) if n]
    return Rendered(lq.name, "DequantizeLinear", qn, sn, zn, layout, ctype, blocked, lq.act_mode, offset, nodes)


# the smallest positive float32: the scale of an all-zero row (its integers are 0 whatever the scale; the
# simulation uses 1), as one Max instead of Equal + Where; every other scale is at least this already
_TINY = float(np.nextafter(np.float32(0), np.float32(1)))


def _dynamic_grid(g: _Graph, x: str, lq: LayerQ, per_token: bool, integers: bool = True) -> tuple[str | None, str, str | None, list]:
    """The simulation's dynamic b-bit grid of `x` as float ops: (q as float, scale, zp, nodes).

    Per token (the last axis reduced, kept as size 1) or over the whole tensor (a scalar).
    Asymmetric: range widened to include 0, scale = (hi - lo) / (2^b - 1), zero point rounded half to
    even and clipped, q = clip(round(x / scale) + zp, 0, 2^b - 1). Symmetric: scale = max|x| /
    (2^(b-1) - 1), zero point 0, q = clip(round(x / scale), -qmax, qmax). `integers=False` stops after
    the scale and zero point (q is None, and so is a symmetric grid's zero point). The nodes are
    returned, not placed.
    """
    qmax = float(2 ** (lq.act_bits - 1) - 1 if lq.act_symmetric else 2**lq.act_bits - 1)
    # only the constants the ops below use (ONNX Runtime warns about unused initializers)
    constants = (("tiny", _TINY), ("qmax", qmax)) + ((("zero", 0.0),) if integers or not lq.act_symmetric else ()) + (
        (("qmin", -qmax),) if lq.act_symmetric and integers else ())
    c = {k: g.add_init(np.array(v, dtype=np.float32), f"{lq.name}.token_{k}") for k, v in constants}
    made = []

    def op(kind, inputs, **attrs):
        out = g.unique(f"{lq.name}.token_{kind.lower()}")
        made.append(helper.make_node(kind, inputs, [out], name=g.unique(f"{lq.name}/token_{kind.lower()}"), **attrs))
        return out

    axes = [g.add_init(np.array([-1], dtype=np.int64), f"{lq.name}.token_axes")] if per_token else []
    keep = int(per_token)
    if lq.act_symmetric:
        scale = op("Max", [op("Div", [op("ReduceMax", [op("Abs", [x]), *axes], keepdims=keep), c["qmax"]]), c["tiny"]])
        if not integers:
            return None, scale, None, made
        return op("Clip", [op("Round", [op("Div", [x, scale])]), c["qmin"], c["qmax"]]), scale, c["zero"], made
    lo = op("Min", [op("ReduceMin", [x, *axes], keepdims=keep), c["zero"]])
    hi = op("Max", [op("ReduceMax", [x, *axes], keepdims=keep), c["zero"]])
    scale = op("Max", [op("Div", [op("Sub", [hi, lo]), c["qmax"]]), c["tiny"]])
    zp = op("Clip", [op("Round", [op("Div", [op("Neg", [lo]), scale])]), c["zero"], c["qmax"]])
    q = op("Clip", [op("Add", [op("Round", [op("Div", [x, scale])]), zp]), c["zero"], c["qmax"]]) if integers else None
    return q, scale, zp, made


def _per_token_fake_quant(g: _Graph, x: str, lq: LayerQ, per_token: bool = True) -> tuple[str, list]:
    """Dynamic quantize-dequantize `(q - zp) * scale` of `x` for grids ONNX has no operator for (per row;
    fewer than 8 bits); the MatMul then runs in float on these values."""
    q, scale, zp, made = _dynamic_grid(g, x, lq, per_token)
    centered, out = g.unique(f"{lq.name}.token_centered"), g.unique(f"{lq.name}.token_dq")
    made += [helper.make_node("Sub", [q, zp], [centered], name=g.unique(f"{lq.name}/token_sub")),
             helper.make_node("Mul", [centered, scale], [out], name=g.unique(f"{lq.name}/token_mul"))]
    return out, made


def _render_embedding(g: _Graph, lq: LayerQ, wname: str) -> Rendered:
    """An integer embedding table (and the tied head reading it).

    8-bit per-row tables: `Gather` picks the integer rows and their scales and zero points, and
    `(q - zp) * scale` dequantizes only the looked-up rows. Lower bits and groups: one
    `DequantizeLinear` of the table feeds the Gather. A tied head reads the same table through
    `DequantizeLinear` (per-row axis 0, the head's output channels), so the file holds one copy.
    """
    ctype, q, scale, zp, blocked, _ = _weight_arrays(lq, "oi", lq.bits)
    g.drop_inits.add(wname)
    qn = g.add_init(q, f"{lq.name}.qweight")
    sn = g.add_init(scale, f"{lq.name}.scale")
    zn = g.add_init(zp, f"{lq.name}.zero_point")
    consumers = list(g.consumers.get(wname, []))
    gathers = [(n, i) for n, i in consumers if n.op_type == "Gather" and i == 0]
    others = [(n, i) for n, i in consumers if (n, i) not in gathers]
    bad = sorted({n.op_type for n, _ in others if n.op_type not in ("Transpose", *COMPUTE_OPS)})
    if bad:
        raise EdgeqError(f"export: embedding {lq.name!r}: its table feeds {bad}; cannot place its integers")
    nodes = []
    row_gather = lq.bits > 4 and not blocked
    if others or not row_gather:
        attrs = {"axis": 1, "block_size": lq.group_size} if blocked else {"axis": 0}
        w = g.unique(f"{lq.name}.weight_dq")
        dq = helper.make_node("DequantizeLinear", [qn, sn, zn], [w], name=g.unique(f"{lq.name}/weight_dq"), **attrs)
        g.head.append(dq)
        nodes.append(dq.name)
        for node, idx in (others if row_gather else consumers):
            node.input[idx] = w
    if row_gather:
        for node, _ in gathers:
            ids, out = node.input[1], node.output[0]
            t = {k: g.unique(f"{lq.name}.rows_{k}") for k in
                 ("q", "qf", "zp", "zpf", "zp_col", "centered", "scale", "scale_col")}
            names = [g.unique(f"{lq.name}/rows_{k}") for k in
                     ("gather_q", "cast_q", "gather_zp", "cast_zp", "unsqueeze_zp", "sub", "gather_scale", "unsqueeze_scale", "mul")]
            axes = g.add_init(np.array([-1], dtype=np.int64), f"{lq.name}.rows_axes")
            g.replace[id(node)] = [
                helper.make_node("Gather", [qn, ids], [t["q"]], name=names[0], axis=0),
                helper.make_node("Cast", [t["q"]], [t["qf"]], name=names[1], to=TensorProto.FLOAT),
                helper.make_node("Gather", [zn, ids], [t["zp"]], name=names[2], axis=0),
                helper.make_node("Cast", [t["zp"]], [t["zpf"]], name=names[3], to=TensorProto.FLOAT),
                helper.make_node("Unsqueeze", [t["zpf"], axes], [t["zp_col"]], name=names[4]),
                helper.make_node("Sub", [t["qf"], t["zp_col"]], [t["centered"]], name=names[5]),
                helper.make_node("Gather", [sn, ids], [t["scale"]], name=names[6], axis=0),
                helper.make_node("Unsqueeze", [t["scale"], axes], [t["scale_col"]], name=names[7]),
                helper.make_node("Mul", [t["centered"], t["scale_col"]], [out], name=names[8]),
            ]
            nodes += names
    op = "Gather" if row_gather else "DequantizeLinear"
    return Rendered(lq.name, op, qn, sn, zn, "oi", ctype, blocked, "none", 0, nodes)


def _integer_grid(g: _Graph, x: str, lq: LayerQ) -> tuple[tuple, list[str]]:
    """Dynamic 8-bit quantization of `x` as uint8 (integers, scale, zero point for MatMulInteger), shared
    by every layer reading `x` on the same grid.

    The scale (and an asymmetric grid's zero point) come from `_dynamic_grid`'s float ops; one
    QuantizeLinear then makes the integers: per tensor, or for per-token grids blocked along the last
    axis with one block per row (opset 21), or (symmetric) per tensor with scale 1 on x / scale. Its
    round(x / scale) + zero point, saturated, is the simulation's clip(round(x / scale) + zp).
    Symmetric grids are shifted by 128 so one scalar zero point serves MatMulInteger (and ORT fuses it
    with the scales into MatMulIntegerToFloat); asymmetric per-row grids keep their row zero points
    (their term is subtracted after the layer).
    """
    key = (x, lq.act_granularity, lq.act_symmetric)
    if key in g.dynamic:
        return g.dynamic[key], []
    per_token = lq.act_granularity == "token"
    _, scale, zp, made = _dynamic_grid(g, x, lq, per_token, integers=False)
    q = g.unique(f"{lq.name}.token_uint8")
    attrs = {"axis": -1, "block_size": lq.q.shape[1]} if per_token else {}
    q_in, q_scale = x, scale
    if lq.act_symmetric:
        zp = q_zp = g.add_init(np.array(128, dtype=np.uint8), f"{lq.name}.token_zero_point")
        if per_token:
            # x / scale by one Div, then a per-tensor QuantizeLinear with scale 1 (exact: y / 1 == y): cheaper in
            # ONNX Runtime than a blocked QuantizeLinear and the zero-point tensor shaped like its scales
            q_in, attrs = g.unique(f"{lq.name}.token_divided"), {}
            q_scale = g.add_init(np.array(1.0, dtype=np.float32), f"{lq.name}.token_unit_scale")
            made.append(helper.make_node("Div", [x, scale], [q_in], name=g.unique(f"{lq.name}/token_divide")))
    else:
        q_zp = g.unique(f"{lq.name}.token_zero_point_uint8")
        made.append(helper.make_node("Cast", [zp], [q_zp], name=g.unique(f"{lq.name}/token_zero_point_cast"), to=TensorProto.UINT8))
        zp = q_zp
    made.append(helper.make_node("QuantizeLinear", [q_in, q_scale, q_zp], [q], name=g.unique(f"{lq.name}/token_quantize"), **attrs))
    g.emit_after_producer(x, made)
    g.dynamic[key] = (q, scale, zp)
    return (q, scale, zp), [n.name for n in made]


def _integer_weight(g: _Graph, lq: LayerQ) -> tuple:
    """The layer's 8-bit integers, scales and zero points as [in, out] initializers for MatMulInteger:
    (container type, offset, integers, scale, zero point names)."""
    ctype, q, scale, zp, _, offset = _weight_arrays(lq, "io", 8, g.u8)
    return ctype, offset, g.add_init(q, f"{lq.name}.qweight"), g.add_init(scale, f"{lq.name}.scale"), g.add_init(zp, f"{lq.name}.zero_point")


def _render_matmul_integer_token(g: _Graph, lq: LayerQ, compute: list) -> Rendered:
    """Per-token asymmetric uint8 activations x 8-bit weights: MatMulInteger on the integers without the rows'
    zero points (ORT's MatMulInteger takes only a scalar one), fused with its scales into MatMulIntegerToFloat,
    minus the zero points' term.

    y = s_x[row] s_w[col] sum_k q_x q_w' - (s_x zp_x)[row] (s_w colsum(q_w'))[col], q_w' = q_w - zp_w: the
    simulation's integers, their products summed exactly in int32; the zero-point term is subtracted in
    float (two passes over the output; an int32 correction before the cast cost five and blocked the
    fusion, a 1.12x slower SmolLM2 prefill against ORT's quantize_dynamic file instead of 1.09x).
    """
    ctype, offset, qn, sn, zn = _integer_weight(g, lq)
    colsum = (lq.q.astype(np.int64) - lq.zero_point.astype(np.int64)).sum(axis=1)
    wc = g.add_init(lq.scale[:, 0].astype(np.float32) * colsum.astype(np.float32), f"{lq.name}.scale_colsum")
    nodes = []
    for node, _ in compute:
        (xq, xs, xz), grid_nodes = _integer_grid(g, node.input[0], lq)
        xzs, zp_nodes = _scaled_zero_point(g, node.input[0], xs, xz, lq.name)
        y = node.output[0]
        s, yi, yf, ys, corr = (g.unique(f"{lq.name}.{n}") for n in ("scale_product", "output_int32", "output_float",
                                                                    "output_scaled", "zp_term"))
        names = [g.unique(f"{lq.name}/{n}") for n in ("scale_mul", "matmul_integer", "cast", "mul", "zp_term", "zp_sub")]
        g.replace[id(node)] = [
            helper.make_node("Mul", [xs, sn], [s], name=names[0]),
            helper.make_node("MatMulInteger", [xq, qn, "", zn], [yi], name=names[1]),
            helper.make_node("Cast", [yi], [yf], name=names[2], to=TensorProto.FLOAT),
            helper.make_node("Mul", [yf, s], [ys], name=names[3]),
            helper.make_node("Mul", [xzs, wc], [corr], name=names[4]),
            helper.make_node("Sub", [ys, corr], [y], name=names[5]),
        ]
        nodes += grid_nodes + zp_nodes + names
    return Rendered(lq.name, "MatMulInteger", qn, sn, zn, "io", ctype, False, "dynamic-token", offset, nodes)


def _scaled_zero_point(g: _Graph, x: str, xs: str, xz: str, layer: str) -> tuple[str, list[str]]:
    """s_x * zp_x per row of `x` (float), shared by every layer reading `x`."""
    key = (x, "scaled_zero_point")
    if key in g.dynamic:
        return g.dynamic[key], []
    zf, out = g.unique(f"{layer}.token_zero_point_float"), g.unique(f"{layer}.token_scaled_zero_point")
    made = [helper.make_node("Cast", [xz], [zf], name=g.unique(f"{layer}/token_zero_point_float"), to=TensorProto.FLOAT),
            helper.make_node("Mul", [xs, zf], [out], name=g.unique(f"{layer}/token_scaled_zero_point"))]
    g.emit_after_producer(x, made)
    g.dynamic[key] = out
    return out, [n.name for n in made]


def _render_matmul_integer_symmetric(g: _Graph, lq: LayerQ, compute: list) -> Rendered:
    """Symmetric dynamic int8 activations (per token or tensor) x 8-bit weights in MatMulInteger.

    The activation integers are shifted into uint8 with one zero point, 128, so nothing needs
    correcting: y = s_x[row] * s_w[col] * sum_k q_x q_w', the integers the simulation multiplies.
    """
    ctype, offset, qn, sn, zn = _integer_weight(g, lq)
    nodes = []
    for node, _ in compute:
        (xq, xs, xz), grid_nodes = _integer_grid(g, node.input[0], lq)
        y = node.output[0]
        s, yi, yf = (g.unique(f"{lq.name}.{n}") for n in ("scale_product", "output_int32", "output_float"))
        names = [g.unique(f"{lq.name}/{n}") for n in ("scale_mul", "matmul_integer", "cast", "mul")]
        # Mul(Cast(MatMulInteger), Mul(x scale, w scale)): the pattern ORT fuses into one MatMulIntegerToFloat
        g.replace[id(node)] = [
            helper.make_node("Mul", [xs, sn], [s], name=names[0]),
            helper.make_node("MatMulInteger", [xq, qn, xz, zn], [yi], name=names[1]),
            helper.make_node("Cast", [yi], [yf], name=names[2], to=TensorProto.FLOAT),
            helper.make_node("Mul", [yf, s], [y], name=names[3]),
        ]
        nodes += grid_nodes + names
    mode = "dynamic-token" if lq.act_granularity == "token" else "dynamic"
    return Rendered(lq.name, "MatMulInteger", qn, sn, zn, "io", ctype, False, mode, offset, nodes)


def _render_matmul_integer(g: _Graph, lq: LayerQ, compute: list, outputs: list[str]) -> Rendered:
    """ORT quantize_dynamic's structure: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul."""
    ctype, offset, qn, sn, zn = _integer_weight(g, lq)
    nodes = []
    for node, _ in compute:
        x, y = node.input[0], node.output[0]
        (xq, xs, xz), qname = g.dynamic_quant(x, lq.name)
        s, yi, yf = (g.unique(f"{lq.name}.{n}") for n in ("scale_product", "output_int32", "output_cast"))
        names = [g.unique(f"{lq.name}/{n}") for n in ("scale_mul", "matmul_integer", "cast", "mul")]
        g.replace[id(node)] = [
            helper.make_node("Mul", [xs, sn], [s], name=names[0]),
            helper.make_node("MatMulInteger", [xq, qn, xz, zn], [yi], name=names[1]),
            helper.make_node("Cast", [yi], [yf], name=names[2], to=TensorProto.FLOAT),
            helper.make_node("Mul", [yf, s], [y], name=names[3]),
        ]
        nodes += ([qname] if qname else []) + names
    return Rendered(lq.name, "MatMulInteger", qn, sn, zn, "io", ctype, False, "dynamic", offset, nodes)
