"""Graph surgery that puts edgeq's integers into a float ONNX graph (onnx_readback.py checks them).

Pure onnx + numpy (no torch). For each quantized layer the float weight initializer
`model.<layer>.weight` is replaced by integers, scales and zero points:
- weight-only and static layers: `DequantizeLinear(int weight, scale, zero point)`; when the
  weight feeds a `Transpose` (how the exporter writes `nn.Linear` as MatMul), the integers are
  stored transposed ([in, out]) and the Transpose disappears, so ONNX Runtime sees DQ -> MatMul
  and fuses integer kernels (MatMulNBits for 4-bit blocks). Per-channel: axis = the output axis;
  groups: opset-21 blocked DQ along the input axis. 2..4-bit values use INT4/UINT4 containers.
- static activations: `QuantizeLinear -> DequantizeLinear` (uint8, or int16 for 16-bit symmetric
  grids; the layer's own grid) on the compute node's input.
- 8-bit dynamic activations (per tensor or per token) on a MatMul: integer kernels, see
  onnx_dynamic.py. In a graph whose every layer input is one row (a batch-1 decode step,
  `single_row`), the token's grid is the tensor's, so per-token layers are rendered like per-tensor
  ones (asymmetric: ORT's own DynamicQuantizeMatMul structure). On Conv/Gemm or grouped weights:
  DynamicQuantizeLinear -> DequantizeLinear on the input (same numbers, float kernel).
Dequantization is `(q - zp) * scale` everywhere, exactly the simulation's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeqError
from ..targets.uses import onnx_dynamic_form, onnx_packed_table
from .onnx_dynamic import per_token_fake_quant, render_matmul_integer, render_matmul_integer_symmetric, render_matmul_integer_token
from .onnx_edit import (COMPUTE_OPS, PACKED_OFFSET, PASSIVE_OPS, Graph, LayerQ, Rendered, constant_value, fix_batch_one,
                        output_readers, static_qdq_layers, transpose_consumers, weight_arrays)

__all__ = ["LayerQ", "Rendered", "int32_biases", "quantize_graph"]
# The static input grids ONNX holds -> their integer type: uint8 (ORT's fused integer kernels), int8 with zero point 0
# (what TensorRT takes; the simulation's symmetric 8-bit grid is [-128, 127], QuantizeLinear's int8 range), int16.
STATIC_GRIDS = {(8, False): np.uint8, (8, True): np.int8, (16, True): np.int16}
# Gemm's attributes and their defaults; (transA, transB, alpha, beta) = (0, 1, 1, 1) is nn.Linear's x @ W.T + b
GEMM_DEFAULTS = {"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0}


def quantize_graph(model: onnx.ModelProto, layers: list[LayerQ], prefix: str = "model",
                   int8_weights: str = "int8", single_row: bool = False) -> tuple[list[Rendered], list[str]]:
    """Replace each layer's float weight in `model` (in place).

    Returns where the integers went, and the layers absent from this graph (the exporter drops
    layers whose output nothing uses, e.g. BERT's pooler when the graph returns hidden states).
    `int8_weights="uint8"` stores symmetric 5..8-bit weights as uint8 with zero point 128 (the same
    real values): ONNX Runtime's u8s8 integer kernels saturate int16 pair sums on x86 CPUs without
    VNNI (AVX2 only), its u8u8 kernels do not. `single_row=True` is for a one-token decode step: the
    graph's batch is fixed to 1, so every quantized layer's input holds one row, and per-token grids
    are rendered as per-tensor ones, the same numbers in fewer operators.
    """
    g = Graph(model.graph)
    g.u8 = int8_weights == "uint8"
    if single_row:
        fix_batch_one(model)
        layers = [replace(lq, act_granularity="tensor") if lq.act_granularity == "token" else lq for lq in layers]
    rendered, absent = [], []
    by_name = {lq.name: lq for lq in layers}
    for lq in layers:
        if lq.tied:
            continue  # rendered with the layer it shares its integers with
        wname = next((w for w in (f"{prefix}.{n}.weight" for n in (lq.name, *lq.aliases)) if w in g.inits), None)
        if wname is None:
            absent.append(lq.name)
            continue
        rendered.append(_render_embedding(g, lq, wname, [by_name[a] for a in lq.aliases if a in by_name])
                        if lq.kind == "embedding" else _render_layer(g, lq, wname))
    if layers and len(absent) == len(layers):
        raise EdgeqError(f"export: none of the {len(layers)} quantized layers' weights is in the ONNX graph "
                         f"(looked for initializers named like {prefix}.{layers[0].name}.weight)")
    _fold_float_transposes(g)
    g.commit()
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
            o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return rendered, absent


def int32_biases(model: onnx.ModelProto) -> dict[str, float]:
    """Write each static Conv's / Gemm's float bias (in place) as ONNX Runtime's integer kernels take it: int32 on the
    scale fp32(input scale * weight scale) per output channel, zero point 0, behind a DequantizeLinear. Returns the
    weight DequantizeLinear's name -> the largest distance of the int32 bias from the float one (at most half a step).

    For the Convs ORT fuses (QuantizeLinear nodes all that read the output), ORT's BiasQuantization computes the same
    integers when it loads the file (Mul, Div, Round, Cast), which the export saved as a subgraph in every file; the
    others ORT leaves float, and so does this. A Gemm ORT left float whatever its output: EfficientNet-Lite0's classifier
    ran on weights dequantized every run (0.78 ms of a 5.7 ms file); with an int32 bias it is QGemm with a float output
    (0.08 ms). Measured on a lone Gemm (ORT 1.32): no bias or an int32 one fuse whatever the output, a float bias only
    with a quantized output. A bias off the int32 grid stays float (ORT's BiasQuantization casts it to INT_MIN when it
    loads the file); a folded BatchNorm's dead channels, where that happens, are rescaled at the fold (batchnorm.BnFold).
    Call it after the output grids are in, which make more Convs' outputs quantized.
    """
    g = Graph(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    errors = {}
    for node, x, w in static_qdq_layers(g):
        if len(node.input) < 3 or node.input[2] not in g.inits or any(a.name == "block_size" and a.i for a in w.attribute):
            continue
        x_scale, x_zero = g.inits.get(x.input[1]), g.inits.get(x.input[2]) if len(x.input) > 2 else None
        if x_scale is None or x_zero is None or x_zero.data_type not in (TensorProto.UINT8, TensorProto.INT8):
            continue  # ORT's integer kernels take 8-bit inputs (int16 grids compute in float)
        if node.op_type == "Conv":
            t, readers = output_readers(g, node, graph_outputs)
            if t in graph_outputs or not readers or any(r.op_type != "QuantizeLinear" for r in readers):
                continue  # a float Conv: a float bias is exact
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if tuple(attrs.get(k, d) for k, d in GEMM_DEFAULTS.items()) != (0, 1, 1.0, 1.0):
                continue
        bias = numpy_helper.to_array(g.inits[node.input[2]]).astype(np.float32)
        x_scale = numpy_helper.to_array(x_scale).astype(np.float32)
        if x_scale.size != 1:
            continue
        scale = (x_scale.reshape(()) * numpy_helper.to_array(g.inits[w.input[1]]).astype(np.float32)).astype(np.float32)
        if bias.ndim != 1 or scale.size not in (1, bias.size):
            continue
        scale = scale.reshape(()) if scale.size == 1 else scale
        q = np.round(bias / scale)
        if np.abs(q).max(initial=0) >= 2**31:
            continue  # off the int32 grid (batchnorm.BnFold.dead rescales a folded norm's dead channels before this)
        q = q.astype(np.int32)
        base = w.name.removesuffix("/weight_dq")
        qn, sn = g.add_init(q, f"{base}.bias_int32"), g.add_init(scale, f"{base}.bias_scale")
        out = g.unique(f"{base}.bias_dq")
        g.head.append(helper.make_node("DequantizeLinear", [qn, sn], [out], name=g.unique(f"{base}/bias_dq"),
                                       **({"axis": 0} if scale.ndim else {})))
        if len(g.consumers.get(node.input[2], [])) == 1:
            g.drop_inits.add(node.input[2])
        node.input[2] = out
        errors[w.name] = float(np.abs(q.astype(np.float64) * scale - bias).max(initial=0))
    g.commit()
    return errors


def _fold_float_transposes(g: Graph) -> None:
    """Store float weights that only feed Transpose already transposed (ORT's own quantizers need MatMul(x, initializer))."""
    for name, init in list(g.inits.items()):
        if name in g.drop_inits or len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        transposes = transpose_consumers(g, name)
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


def _render_layer(g: Graph, lq: LayerQ, wname: str) -> Rendered:
    transposes = transpose_consumers(g, wname) if lq.kind == "linear" else None
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
    if lq.act_mode == "static" and (lq.act_bits, lq.act_symmetric) not in STATIC_GRIDS:
        raise EdgeqError(f"export: layer {lq.name!r}: ONNX static activations must be 8-bit (uint8, or int8 when symmetric) "
                         f"or 16-bit symmetric (int16), got {lq.act_bits}-bit {'symmetric' if lq.act_symmetric else 'asymmetric'}")
    matmul = layout == "io" and not passive and all(n.op_type == "MatMul" for n, _ in compute)
    matmul_integer = lq.act_mode == "dynamic" and _dynamic_form(lq, matmul) == "integer"
    if matmul_integer and lq.act_symmetric:
        return render_matmul_integer_symmetric(g, lq, compute)
    if matmul_integer and lq.act_granularity == "token":
        return render_matmul_integer_token(g, lq, compute)
    if matmul_integer:
        return render_matmul_integer(g, lq, compute)
    return _render_dq(g, lq, layout, outputs, compute, passive)


def _render_dq(g: Graph, lq: LayerQ, layout: str, outputs: list[str], compute: list, passive: list = ()) -> Rendered:
    # int8 activations keep int8 weights: ORT's s8s8 kernels, and TensorRT refuses uint8 weights
    u8 = g.u8 and lq.act_mode != "none" and not (lq.act_mode == "static" and lq.act_symmetric and lq.act_bits == 8)
    ctype, q, scale, zp, blocked, offset = weight_arrays(lq, layout, lq.bits, u8)
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
        for node, _ in compute:
            # a zero Pad before the layer (TF-style "same" padding) reads the quantized input instead: zero is exact on
            # every grid, so the values are the same. It is folded into the Conv's pads where it pads the spatial axes
            # (as ONNX Runtime's PadFusion does when it loads the file, so TensorRT too reads DQ -> Conv), else it
            # stays between the DequantizeLinear and the Conv, where ONNX Runtime folds it
            pad = _zero_pad(g, node.input[0])
            reader = node if pad is None or _fold_pad(g, pad, node) else pad
            (xq, asn, azn), qn_ = _static_quant(g, reader.input[0], lq)
            xdq, dqn_ = g.unique(f"{lq.name}.input_dq"), g.unique(f"{lq.name}/input_dq")
            g.before.setdefault(id(reader), []).append(helper.make_node("DequantizeLinear", [xq, asn, azn], [xdq], name=dqn_))
            reader.input[0] = xdq
            nodes += [qn_, dqn_]
    elif lq.act_mode == "dynamic" and _dynamic_form(lq, matmul=False) == "float":
        # as float ops, also where DynamicQuantizeLinear could do it (per tensor, 8-bit asymmetric: a decode step's
        # one row): ORT fuses these weights' DequantizeLinear -> MatMul into MatMulNBits only after a float input
        for node, _ in compute:
            xdq, made = per_token_fake_quant(g, node.input[0], lq, per_token=lq.act_granularity == "token")
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


def _zero_pad(g: Graph, x: str):
    """The Pad producing `x` if it pads with zeros and `x` feeds nothing else, else None."""
    pad = g.producer.get(x)
    if pad is None or pad.op_type != "Pad" or len(g.consumers.get(x, [])) != 1:
        return None
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    value = constant_value(g, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if mode != b"constant" or value is None or value.any():
        return None
    return pad


def _fold_pad(g: Graph, pad, conv) -> bool:
    """Fold a zero Pad of the spatial axes into the Conv reading it (its `pads` grow by the Pad's; the Conv then reads
    the Pad's input, and the Pad is dropped); False, changing nothing, where it cannot be (pads not constant or
    negative, or on the batch / channel axes, an `axes` input, a Conv with auto_pad)."""
    if conv.op_type != "Conv" or (len(pad.input) > 3 and pad.input[3]):
        return False
    amounts = constant_value(g, pad.input[1]) if len(pad.input) > 1 and pad.input[1] else None
    attrs = {a.name: a for a in conv.attribute}
    if amounts is None or amounts.ndim != 1 or amounts.size % 2 or (amounts < 0).any():
        return False
    rank = amounts.size // 2
    begin, end = amounts[:rank].tolist(), amounts[rank:].tolist()
    auto_pad = attrs["auto_pad"].s if "auto_pad" in attrs else b"NOTSET"
    if rank < 3 or any(begin[:2] + end[:2]) or auto_pad not in (b"", b"NOTSET"):
        return False
    spatial = rank - 2
    old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
    pads = [o + a for o, a in zip(old, begin[2:] + end[2:])]
    kept = [a for a in conv.attribute if a.name != "pads"]
    del conv.attribute[:]
    conv.attribute.extend(kept + [helper.make_attribute("pads", pads)])
    conv.input[0] = pad.input[0]
    g.replace[id(pad)] = []
    return True


def _dynamic_form(lq: LayerQ, matmul: bool) -> str:
    return onnx_dynamic_form(matmul, lq.bits, lq.group_size, lq.act_bits, lq.act_symmetric, lq.act_granularity)


def _static_quant(g: Graph, x: str, lq: LayerQ) -> tuple[tuple[str, str, str], str]:
    """The static QuantizeLinear of `x` on the layer's grid: ((integers, scale, zero point), node name).

    One per tensor and grid, shared by every layer reading `x` with bitwise the same scale and zero point
    (q/k/v after one norm, gate/up: calibrated on the same tensor), as ORT's quantize_static writes it; each
    layer keeps its own DequantizeLinear (ORT fuses each into its layer's MatMulIntegerToFloat). One
    QuantizeLinear per tensor instead of per layer: 211 -> 121 on SmolLM2, ~1.2 ms of a 64-token prefill.
    """
    # the zero point's type is the integers' type: uint8, or int8 / int16 (zero point 0) for symmetric grids
    scale = lq.act_scale.reshape(()).astype(np.float32)
    zp = lq.act_zero_point.reshape(()).astype(STATIC_GRIDS[(lq.act_bits, lq.act_symmetric)])
    key = (x, "static", scale.tobytes(), zp.dtype.str, zp.tobytes())
    if key not in g.input_quant:
        asn, azn = g.add_init(scale, f"{lq.name}.act_scale"), g.add_init(zp, f"{lq.name}.act_zero_point")
        xq, qn_ = g.unique(f"{lq.name}.input_q"), g.unique(f"{lq.name}/input_q")
        g.emit_after_producer(x, [helper.make_node("QuantizeLinear", [x, asn, azn], [xq], name=qn_)])
        g.input_quant[key] = ((xq, asn, azn), qn_)
    return g.input_quant[key]


def _render_embedding(g: Graph, lq: LayerQ, wname: str, heads: list[LayerQ] = ()) -> Rendered:
    """An integer embedding table (and the tied heads reading it, `heads`).

    8-bit per-row tables: `Gather` picks the integer rows and their scales and zero points, and
    `(q - zp) * scale` dequantizes only the looked-up rows. Symmetric 4-bit blocks (`onnx_packed_table`):
    ONNX Runtime's packed layout, looked up with com.microsoft.GatherBlockQuantized and read by a tied
    head as com.microsoft.MatMulNBits (accuracy level 0), one initializer for both. Otherwise one
    `DequantizeLinear` of the table feeds the Gather. A tied head reads the same table through
    `DequantizeLinear` (per-row axis 0, the head's output channels), so the file holds one copy; its
    input grid (`[embedding] head_activation`) is computed with float ops before it.
    """
    consumers = list(g.consumers.get(wname, []))
    gathers = [(n, i) for n, i in consumers if n.op_type == "Gather" and i == 0]
    others = [(n, i) for n, i in consumers if (n, i) not in gathers]
    bad = sorted({n.op_type for n, _ in others if n.op_type not in ("Transpose", *COMPUTE_OPS)})
    if bad:
        raise EdgeqError(f"export: embedding {lq.name!r}: its table feeds {bad}; cannot place its integers")
    g.drop_inits.add(wname)
    # the tied heads' compute nodes: reading the table itself, or through Transpose (how the exporter writes nn.Linear)
    head_nodes = [c for n, i in others for c in (g.consumers.get(n.output[0], []) if n.op_type == "Transpose" else [(n, i)])]
    nodes = []
    grid = _head_grid(lq, heads)
    if grid is not None:
        for node, _ in head_nodes:
            xdq, made = per_token_fake_quant(g, node.input[0], grid, per_token=grid.act_granularity == "token")
            g.before.setdefault(id(node), []).extend(made)
            node.input[0] = xdq
            nodes += [n.name for n in made]
    if (onnx_packed_table(lq.bits, lq.symmetric, lq.group_size, lq.q.shape[1])
            and all(n.op_type == "Transpose" for n, _ in others) and all(n.op_type == "MatMul" and i == 1 for n, i in head_nodes)):
        return _render_packed_table(g, lq, gathers, [n for n, _ in others], [n for n, _ in head_nodes], nodes)
    ctype, q, scale, zp, blocked, _ = weight_arrays(lq, "oi", lq.bits)
    qn = g.add_init(q, f"{lq.name}.qweight")
    sn = g.add_init(scale, f"{lq.name}.scale")
    zn = g.add_init(zp, f"{lq.name}.zero_point")
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


def _head_grid(lq: LayerQ, heads: list[LayerQ]) -> LayerQ | None:
    """The tied heads' dynamic input grid (one layer holding it), None for float inputs."""
    grids = {(h.act_mode, h.act_bits, h.act_symmetric, h.act_granularity) for h in heads}
    if len(grids) > 1:
        raise EdgeqError(f"export: the layers tied to {lq.name!r} ({', '.join(h.name for h in heads)}) have different input "
                         "grids; ONNX renders one per table")
    return next((h for h in heads if h.act_mode == "dynamic"), None)


def _render_packed_table(g: Graph, lq: LayerQ, gathers: list, transposes: list, head_nodes: list, nodes: list) -> Rendered:
    """A symmetric 4-bit blocked table in ONNX Runtime's packed layout ([rows, blocks, block / 2] bytes, low nibble
    first, each value + 8 around the ops' default zero point 8): com.microsoft.GatherBlockQuantized looks rows up
    (dequantizing only those), com.microsoft.MatMulNBits computes each tied head from the same bytes."""
    n, k = lq.q.shape
    block = lq.group_size
    u = (lq.q.astype(np.int16) + PACKED_OFFSET).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, k // block, block // 2)
    qn = g.add_init(np.ascontiguousarray(packed), f"{lq.name}.qweight")
    sn = g.add_init(np.ascontiguousarray(lq.scale.astype(np.float32)), f"{lq.name}.scale")  # [rows, blocks]
    for t in transposes:
        g.replace[id(t)] = []
    for node in head_nodes:
        g.replace[id(node)] = [helper.make_node("MatMulNBits", [node.input[0], qn, sn], list(node.output), name=node.name,
                                                domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=0)]
        nodes.append(node.name)
    if gathers:
        s3 = g.unique(f"{lq.name}.scale_blocks")
        shape = g.add_init(np.array([n, k // block, 1], dtype=np.int64), f"{lq.name}.scale_blocks_shape")
        g.head.append(helper.make_node("Reshape", [sn, shape], [s3], name=g.unique(f"{lq.name}/scale_blocks")))
        width = g.add_init(np.array([k], dtype=np.int64), f"{lq.name}.row_width")
        for node, _ in gathers:
            ids, out = node.input[1], node.output[0]
            t = {x: g.unique(f"{lq.name}.rows_{x}") for x in ("blocks", "ids_shape", "shape")}
            names = [g.unique(f"{lq.name}/rows_{x}") for x in ("gather", "ids_shape", "shape", "reshape")]
            g.replace[id(node)] = [
                helper.make_node("GatherBlockQuantized", [qn, ids, s3], [t["blocks"]], name=names[0], domain="com.microsoft",
                                 gather_axis=0, quantize_axis=2, block_size=block),  # 4 bits (no `bits` before ORT 1.23)
                helper.make_node("Shape", [ids], [t["ids_shape"]], name=names[1]),
                helper.make_node("Concat", [t["ids_shape"], width], [t["shape"]], name=names[2], axis=0),
                helper.make_node("Reshape", [t["blocks"], t["shape"]], [out], name=names[3]),
            ]
            nodes += names
    op = "GatherBlockQuantized" if gathers else "MatMulNBits"
    return Rendered(lq.name, op, qn, sn, "", "oi", "uint4", True, "none", PACKED_OFFSET, nodes)
