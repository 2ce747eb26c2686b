"""Dynamic INT8 activations on a MatMul as ONNX Runtime integer kernels (called by onnx_quant.py).

- per tensor: the structure ORT's own `quantize_dynamic` writes (DynamicQuantizeLinear,
  MatMulInteger, Cast, Mul by x_scale * w_scale), which ORT fuses into DynamicQuantizeMatMul.
- per token: each row's scale (and zero point) from float ops, the integers from one QuantizeLinear
  blocked along the last axis, a block per row. Symmetric grids are shifted into
  uint8 (+128, one scalar zero point) and the layer is MatMulInteger, Cast and Mul by
  x_scale * w_scale, which ORT fuses into MatMulIntegerToFloat; asymmetric rows keep their zero
  points, which MatMulInteger sums itself from extra input columns against extra weight rows (ORT's
  takes only a scalar activation zero point), fused the same way.
- grids ONNX has no integer kernel for (fewer than 8 bits, per row on Conv/Gemm): quantize-dequantize
  with float ops (`per_token_fake_quant`), the layer then computes in float.
Dequantization is `(q - zp) * scale`, exactly the simulation's.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .onnx_edit import Graph, LayerQ, Rendered, weight_arrays

# the smallest positive float32: the scale of an all-zero row (its integers are 0 whatever the scale; the
# simulation uses 1), as one Max instead of Equal + Where; every other scale is at least this already
_TINY = float(np.nextafter(np.float32(0), np.float32(1)))


def _dynamic_grid(g: Graph, x: str, lq: LayerQ, per_token: bool, integers: bool = True) -> tuple[str | None, str, str | None, list]:
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


def per_token_fake_quant(g: Graph, x: str, lq: LayerQ, per_token: bool = True) -> tuple[str, list]:
    """Dynamic quantize-dequantize `(q - zp) * scale` of `x` for grids ONNX has no operator for (per row;
    fewer than 8 bits); the MatMul then runs in float on these values."""
    q, scale, zp, made = _dynamic_grid(g, x, lq, per_token)
    centered, out = g.unique(f"{lq.name}.token_centered"), g.unique(f"{lq.name}.token_dq")
    made += [helper.make_node("Sub", [q, zp], [centered], name=g.unique(f"{lq.name}/token_sub")),
             helper.make_node("Mul", [centered, scale], [out], name=g.unique(f"{lq.name}/token_mul"))]
    return out, made


def _integer_grid(g: Graph, x: str, lq: LayerQ) -> tuple[tuple, list[str]]:
    """Dynamic 8-bit quantization of `x` as uint8 (integers, scale, zero point for MatMulInteger, and for
    asymmetric grids the zero point as float, else None), shared by every layer reading `x` on the same grid.

    The scale (and an asymmetric grid's zero point) come from `_dynamic_grid`'s float ops; one
    QuantizeLinear then makes the integers: per tensor, or for per-token grids blocked along the last
    axis with one block per row (opset 21). Its round(x / scale) + zero point, saturated, is the
    simulation's clip(round(x / scale) + zp).
    Symmetric grids are shifted by 128 so one scalar zero point serves MatMulInteger (and ORT fuses it
    with the scales into MatMulIntegerToFloat); asymmetric per-row grids keep their row zero points
    (`render_matmul_integer_token` takes care of their term).
    """
    key = (x, lq.act_granularity, lq.act_symmetric)
    if key in g.input_quant:
        return g.input_quant[key], []
    per_token = lq.act_granularity == "token"
    _, scale, zp, made = _dynamic_grid(g, x, lq, per_token, integers=False)
    q = g.unique(f"{lq.name}.token_uint8")
    attrs = {"axis": -1, "block_size": lq.q.shape[1]} if per_token else {}
    float_zp = None
    if lq.act_symmetric:
        zp = q_zp = g.add_init(np.array(128, dtype=np.uint8), f"{lq.name}.token_zero_point")
        if per_token:
            # the blocked QuantizeLinear wants a zero point shaped like its scales: 128 per row, from the scales'
            # shape (two tiny ops; a Div by the scales and a QuantizeLinear on scale 1 cost a pass over x more)
            shape, q_zp = g.unique(f"{lq.name}.token_rows"), g.unique(f"{lq.name}.token_row_zero_points")
            made += [helper.make_node("Shape", [scale], [shape], name=g.unique(f"{lq.name}/token_rows")),
                     helper.make_node("ConstantOfShape", [shape], [q_zp], name=g.unique(f"{lq.name}/token_row_zero_points"),
                                      value=helper.make_tensor("value", TensorProto.UINT8, [1], [128]))]
    else:
        q_zp, float_zp = g.unique(f"{lq.name}.token_zero_point_uint8"), zp
        made.append(helper.make_node("Cast", [zp], [q_zp], name=g.unique(f"{lq.name}/token_zero_point_cast"), to=TensorProto.UINT8))
        zp = q_zp
    made.append(helper.make_node("QuantizeLinear", [x, scale, q_zp], [q], name=g.unique(f"{lq.name}/token_quantize"), **attrs))
    g.emit_after_producer(x, made)
    g.input_quant[key] = (q, scale, zp, float_zp)
    return g.input_quant[key], [n.name for n in made]


def _integer_weight(g: Graph, lq: LayerQ, with_zero_point_rows: bool = False) -> tuple:
    """The layer's 8-bit integers, scales and zero points as [in, out] initializers for MatMulInteger:
    (container type, offset, integers, scale, zero point names, zero-point rows). With `with_zero_point_rows` the
    integers carry `zero_point_rows` after their own, where those can be stored (else, and by default, None)."""
    ctype, q, scale, zp, _, offset = weight_arrays(lq, "io", 8, g.u8)
    rows = zero_point_rows(q, zp, lq.symmetric) if with_zero_point_rows else None
    stored = q if rows is None else np.concatenate([q, rows])
    return (ctype, offset, g.add_init(stored, f"{lq.name}.qweight"), g.add_init(scale, f"{lq.name}.scale"),
            g.add_init(zp, f"{lq.name}.zero_point"), rows)


def _scaled_matmul_integer(g: Graph, lq: LayerQ, x: tuple[str, str, str], w: tuple[str, str, str], y: str) -> list:
    """y = Cast(MatMulInteger(x, w)) * (x scale * w scale): the pattern ORT fuses into one MatMulIntegerToFloat.

    `x` and `w` are (integers, scale, zero point) names; an empty zero point is 0."""
    (xq, xs, xz), (qn, sn, zn) = x, w
    s, yi, yf = (g.unique(f"{lq.name}.{n}") for n in ("scale_product", "output_int32", "output_float"))
    names = [g.unique(f"{lq.name}/{n}") for n in ("scale_mul", "matmul_integer", "cast", "mul")]
    return [helper.make_node("Mul", [xs, sn], [s], name=names[0]),
            helper.make_node("MatMulInteger", [xq, qn, xz, zn], [yi], name=names[1]),
            helper.make_node("Cast", [yi], [yf], name=names[2], to=TensorProto.FLOAT),
            helper.make_node("Mul", [yf, s], [y], name=names[3])]


# at most this many zero-point rows (SmolLM2 needs 17-33: 1-3% more integer work); beyond it the term is
# subtracted in float
MAX_ZERO_POINT_ROWS = 64


def zero_point_rows(q: np.ndarray, zp: np.ndarray, symmetric: bool) -> np.ndarray | None:
    """Rows that, appended to the [in, out] stored integers `q` (zero points `zp` per column), make MatMulInteger
    subtract each activation row's zero point itself: with that zero point repeated in as many extra input columns,
    sum_k q_x q_w' + zp_x sum_j r_j = sum_k (q_x - zp_x) q_w', the simulation's integer sum, exact in int32.

    The rows hold -colsum(q_w') in pieces of at most 127 (stored + zp, inside the container). None for asymmetric
    weights (their zero points leave no such margin) or when more than MAX_ZERO_POINT_ROWS rows would be needed.
    """
    if not symmetric:
        return None
    rest = -(q.astype(np.int64) - zp.astype(np.int64)).sum(axis=0)
    count = int(-(-np.abs(rest).max() // 127))
    if count > MAX_ZERO_POINT_ROWS:
        return None
    pieces = []
    for _ in range(count):
        pieces.append(np.clip(rest, -127, 127))
        rest = rest - pieces[-1]
    return (np.stack(pieces) + zp.astype(np.int64)).astype(q.dtype) if pieces else np.zeros((0, q.shape[1]), q.dtype)


def render_matmul_integer_token(g: Graph, lq: LayerQ, compute: list) -> Rendered:
    """Per-token asymmetric uint8 activations x 8-bit weights: the rows' zero points go into MatMulInteger as extra
    input columns against `zero_point_rows` of the weights (ORT's MatMulInteger takes only a scalar activation zero
    point), which ORT fuses with the scales into MatMulIntegerToFloat.

    y = s_x[row] s_w[col] sum_k (q_x - zp_x) q_w', q_w' = q_w - zp_w: the simulation's integers, their products summed
    exactly in int32. The input columns cost one Concat of the uint8 integers. Where the rows cannot be stored, the
    zero-point term `(s_x zp_x)[row] (s_w colsum(q_w'))[col]` is subtracted after the layer in float instead (two passes
    over the output, 4.3 ms of a 64-token SmolLM2 prefill on its LM head's 49152 logits).
    """
    ctype, offset, qn, sn, zn, rows = _integer_weight(g, lq, with_zero_point_rows=True)
    if rows is None:
        colsum = (lq.q.astype(np.int64) - lq.zero_point.astype(np.int64)).sum(axis=1)
        wc = g.add_init(lq.scale[:, 0].astype(np.float32) * colsum.astype(np.float32), f"{lq.name}.scale_colsum")
    nodes = []
    for node, _ in compute:
        (xq, xs, xz, x_zp), grid_nodes = _integer_grid(g, node.input[0], lq)
        if rows is not None:
            widened = g.unique(f"{lq.name}.token_uint8_with_zero_points")
            concat = helper.make_node("Concat", [xq] + [xz] * len(rows), [widened], name=g.unique(f"{lq.name}/zero_point_columns"), axis=-1)
            made = [concat] + _scaled_matmul_integer(g, lq, (widened, xs, ""), (qn, sn, zn), node.output[0])
            after = _bias_outside_fusion(g, lq, node.output[0])
        else:
            ys, xzs, corr = (g.unique(f"{lq.name}.{n}") for n in ("output_scaled", "token_scaled_zero_point", "zp_term"))
            made = _scaled_matmul_integer(g, lq, (xq, xs, ""), (qn, sn, zn), ys) + [
                helper.make_node("Mul", [xs, x_zp], [xzs], name=g.unique(f"{lq.name}/token_scaled_zero_point")),
                helper.make_node("Mul", [xzs, wc], [corr], name=g.unique(f"{lq.name}/zp_term")),
                helper.make_node("Sub", [ys, corr], [node.output[0]], name=g.unique(f"{lq.name}/zp_sub"))]
            after = []
        g.replace[id(node)] = made
        nodes += grid_nodes + [n.name for n in made] + after
    return Rendered(lq.name, "MatMulInteger", qn, sn, zn, "io", ctype, False, "dynamic-token", offset, nodes,
                    zero_point_rows=0 if rows is None else len(rows))


def render_matmul_integer_symmetric(g: Graph, lq: LayerQ, compute: list) -> Rendered:
    """Symmetric dynamic int8 activations (per token or tensor) x 8-bit weights in MatMulInteger.

    The activation integers are shifted into uint8 with one zero point, 128, so nothing needs
    correcting: y = s_x[row] * s_w[col] * sum_k q_x q_w', the integers the simulation multiplies.
    """
    ctype, offset, qn, sn, zn, _ = _integer_weight(g, lq)
    nodes = []
    for node, _ in compute:
        (xq, xs, xz, _), grid_nodes = _integer_grid(g, node.input[0], lq)
        g.replace[id(node)] = made = _scaled_matmul_integer(g, lq, (xq, xs, xz), (qn, sn, zn), node.output[0])
        nodes += grid_nodes + [n.name for n in made]
        if lq.act_granularity == "token":
            nodes += _bias_outside_fusion(g, lq, node.output[0])
    mode = "dynamic-token" if lq.act_granularity == "token" else "dynamic"
    return Rendered(lq.name, "MatMulInteger", qn, sn, zn, "io", ctype, False, mode, offset, nodes)


def _bias_outside_fusion(g: Graph, lq: LayerQ, y: str) -> list[str]:
    """Rewrite a constant bias `Add(y, b)` after a per-row-scaled layer as `Sub(y, -b)` (bitwise the same sum).

    ORT's MatMulIntegerToFloat fusion takes a following bias Add into the fused kernel, which then multiplies the
    bias by each row's activation scale when that scale is per row (onnxruntime 1.32: y = acc s_x s_w + b s_x,
    measured; correct for a scalar scale): BERT's biased linears came out wrong by up to |b|. The fusion does not
    take a Sub, so the kernel still fuses the scales and the bias is added exactly after it."""
    names = []
    for add, i in list(g.consumers.get(y, [])):
        other = add.input[1 - i] if add.op_type == "Add" and len(add.input) == 2 else None
        if other is None or other not in g.inits:
            continue
        neg = g.add_init(-numpy_helper.to_array(g.inits[other]), f"{lq.name}.negated_bias")
        sub = helper.make_node("Sub", [y, neg], list(add.output), name=g.unique(f"{lq.name}/bias_sub"))
        g.replace[id(add)] = [sub]
        if all(id(n) == id(add) for n, _ in g.consumers.get(other, [])):
            g.drop_inits.add(other)
        names.append(sub.name)
    return names


def render_matmul_integer(g: Graph, lq: LayerQ, compute: list) -> Rendered:
    """ORT quantize_dynamic's structure: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul."""
    ctype, offset, qn, sn, zn, _ = _integer_weight(g, lq)
    nodes = []
    for node, _ in compute:
        x_grid, qname = g.dynamic_quant(node.input[0], lq.name)
        g.replace[id(node)] = made = _scaled_matmul_integer(g, lq, x_grid, (qn, sn, zn), node.output[0])
        nodes += ([qname] if qname else []) + [n.name for n in made]
    return Rendered(lq.name, "MatMulInteger", qn, sn, zn, "io", ctype, False, "dynamic", offset, nodes)
