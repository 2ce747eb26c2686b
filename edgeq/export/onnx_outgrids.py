"""Output grids for an ONNX int8 file's Convs and Gemms (`export(..., output_grids=True)`; pure onnx + numpy + ORT).

ONNX Runtime runs a QDQ Conv / Gemm on its integer kernel (QLinearConv / QGemm) only when QuantizeLinear nodes are
all that read its output. edgeq's simulation quantizes each layer's input, so a Conv whose output also reaches a
float op (a residual Add, a pooling) stays a float Conv on a weight dequantized every run: 15 of EfficientNet-
Lite0's 49. With output grids, every tensor of the file that a float op reads is quantized, as ORT's
quantize_static quantizes every tensor and edgeq's TFLite int8 files requantize every layer's output:
- `insert`: such a Conv / Gemm output (after the Relu / Clip ORT drops into the kernel) gets a QuantizeLinear ->
  DequantizeLinear of its own, uint8 on a min/max grid calibrated by running the file on calibration inputs, which
  all its readers read (the next layer's input grid requantizes it). Reading it on the next layer's input grid
  instead (percentile-calibrated by the simulation) saved those 5 requantizations in EfficientNet-Lite0 but measured
  worse: KL to fp32 0.0156 against 0.0141 on 64 crops, at 0.98x the time.
- `share_quantized`: a tensor that a layer's input grid quantizes (a QuantizeLinear reads it) and other ops read
  too (a residual Add's output that the next block's Add also reads) is read by all of them through that grid. ORT
  fuses a QDQ unit (QLinearAdd) only when each input is dequantized and QuantizeLinear nodes are all that read its
  output; 7 of EfficientNet-Lite0's 9 residual Adds were not, and ran in float.
- `global_pools`: a mean over a dequantized tensor's spatial axes (torch's `x.mean((2, 3))`, ReduceMean) becomes
  GlobalAveragePool, which ORT fuses with its QDQ into QLinearGlobalAveragePool; it fuses no QDQ ReduceMean
  (measured, ORT 1.32: EfficientNet-Lite0's pooling ran as DequantizeLinear + float ReduceMean + QuantizeLinear).
A float Conv / ConvTranspose / Gemm (a layer the recipe leaves float) never reads a dequantized tensor here: ONNX
Runtime's WeightBiasQuantization (a level-1 optimization, so also at every session's load) quantizes the float
weight of such a layer to one int8 scale per tensor when it reads a DequantizeLinear (through a Pad it fuses in
first) and its output goes to a QuantizeLinear. Layers `--recipe auto` kept float became per-tensor int8 ones
(EfficientNet-Lite0, static plan at 30%: 4 of 23; ORT 1.32). Such a layer reads the float tensor, as in the
simulation.

It is a departure from the simulation, which FILE.json's `parity` measures and `output_grids` records.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_edit import Graph, constant_value, dequantized_by, output_readers, static_qdq_layers

ELEMENTWISE_UNITS = ("Add", "Mul", "Concat")  # ORT's QLinearAdd / QLinearMul / QLinearConcat, from a QDQ unit


def outputs_needing_grids(model: onnx.ModelProto) -> dict[str, bool]:
    """The tensors to quantize, -> whether the grid is symmetric int8 (the layer's input grid is: the `w8a8-sym` form,
    TensorRT's) rather than uint8: the output of each static QDQ Conv / Gemm (after a Relu / Clip that is its only
    reader), and of each Add / Mul / Concat all of whose inputs are dequantized (the QDQ units ORT runs on QLinear
    kernels), that something besides QuantizeLinear reads; graph outputs (logits) stay float."""
    g = Graph(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    units = [(node, x) for node, x, _ in static_qdq_layers(g)]
    for node in model.graph.node:
        inputs = [g.producer.get(i) for i in node.input]
        if node.op_type in ELEMENTWISE_UNITS and all(p is not None and p.op_type == "DequantizeLinear" for p in inputs):
            units.append((node, inputs[0]))
    found = {}
    for node, x in units:
        t, readers = output_readers(g, node, graph_outputs)
        if t in graph_outputs or not readers or all(r.op_type == "QuantizeLinear" or float_layer(g, r) for r in readers):
            continue
        zero = g.inits.get(x.input[2]) if len(x.input) > 2 else None
        found[t] = zero is not None and zero.data_type == TensorProto.INT8
    return found


def calibrate(model: onnx.ModelProto, tensors: dict[str, bool], feeds: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tensor -> (scale, zero point) of a uint8 grid spanning its min..max (and 0) over `feeds`, run in ONNX Runtime;
    of an int8 grid with zero point 0 spanning its largest magnitude where `tensors` says symmetric."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo = {t: 0.0 for t in tensors}
    hi = {t: 0.0 for t in tensors}
    for feed in feeds:
        values = session.run(list(tensors), feed)
        for t, v in zip(tensors, values):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    grids = {}
    for t, symmetric in tensors.items():
        if symmetric:
            grids[t] = (np.array(max(-lo[t], hi[t], 1e-8) / 127.0, dtype=np.float32), np.array(0, dtype=np.int8))
            continue
        scale = np.float32(max(hi[t] - lo[t], 1e-8) / 255.0)
        zero_point = np.uint8(np.clip(np.round(-lo[t] / scale), 0, 255))
        grids[t] = (np.array(scale, dtype=np.float32), np.array(zero_point, dtype=np.uint8))
    return grids


def insert(model: onnx.ModelProto, grids: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Put QuantizeLinear -> DequantizeLinear on each tensor of `grids`, its readers reading the dequantized values."""
    g = Graph(model.graph)
    for t, (scale, zero_point) in grids.items():
        s, z = g.add_init(scale, f"{t}.output_scale"), g.add_init(zero_point, f"{t}.output_zero_point")
        q, dq = g.unique(f"{t}.output_q"), g.unique(f"{t}.output_dq")
        for node, i in g.consumers.get(t, []):
            if not float_layer(g, node):
                node.input[i] = dq
        g.emit_after_producer(t, [helper.make_node("QuantizeLinear", [t, s, z], [q], name=g.unique(f"{t}/output_q")),
                                  helper.make_node("DequantizeLinear", [q, s, z], [dq], name=g.unique(f"{t}/output_dq"))])
    g.commit()


def global_pools(model: onnx.ModelProto) -> int:
    """Replace each ReduceMean over every spatial axis of a dequantized tensor (rank >= 3) by GlobalAveragePool, followed
    by a Squeeze of those axes where the mean drops them (keepdims=0; ORT moves the next QuantizeLinear above a Squeeze,
    measured, not above a Flatten); the same values. Returns how many were replaced."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*inferred.value_info, *inferred.input]
             if vi.type.tensor_type.HasField("shape")}
    g = Graph(model.graph)
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "ReduceMean" or dequantized_by(g, node.input[0], False) is None:
            continue
        rank = ranks.get(node.input[0], 0)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attrs.get("axes")  # an attribute before opset 18, an input since
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = constant_value(g, node.input[1])
        if rank < 3 or axes is None or sorted(int(a) % rank for a in np.ravel(axes)) != list(range(2, rank)):
            continue
        keep = attrs.get("keepdims", 1)
        pooled = node.output[0] if keep else g.unique(f"{node.output[0]}.pooled")
        nodes = [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=g.unique(f"{node.name}/global_pool"))]
        if not keep:
            spatial = g.add_init(np.arange(2, rank, dtype=np.int64), f"{node.name}.spatial_axes")
            nodes.append(helper.make_node("Squeeze", [pooled, spatial], [node.output[0]], name=g.unique(f"{node.name}/squeeze")))
        g.replace[id(node)] = nodes
        replaced += 1
    g.commit()
    return replaced


def share_quantized(model: onnx.ModelProto) -> int:
    """Let the other readers of a float tensor that a QuantizeLinear also reads read its dequantized values, on that
    QuantizeLinear's grid (the widest, where several read it); graph inputs and outputs stay as they are. Returns how
    many tensors were shared."""
    g = Graph(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    shared = 0
    for t, uses in g.consumers.items():
        producer = g.producer.get(t)
        if producer is None or producer.op_type in ("QuantizeLinear", "DequantizeLinear") or t in graph_outputs:
            continue
        grids = [node for node, i in uses if node.op_type == "QuantizeLinear" and i == 0 and _per_tensor(g, node)]
        others = [(node, i) for node, i in uses if node.op_type != "QuantizeLinear" and not float_layer(g, node)]
        if not grids or not others:
            continue
        q = max(grids, key=lambda n: _grid_range(g, n))
        dq = g.unique(f"{t}.shared_dq")
        for node, i in others:
            node.input[i] = dq
        g.after.setdefault(id(q), []).append(
            helper.make_node("DequantizeLinear", [q.output[0], *q.input[1:]], [dq], name=g.unique(f"{t}/shared_dq")))
        shared += 1
    g.commit()
    return shared


def float_layer(g: Graph, node) -> bool:
    """A Conv / ConvTranspose / Gemm whose weight no DequantizeLinear gives: a layer left float, which ONNX Runtime
    would quantize per tensor if it read a dequantized tensor (module docstring); or a Pad only such layers read, which
    ONNX Runtime fuses into them first (EfficientNet's TF-style "same" padding)."""
    if node.op_type == "Pad":
        readers = g.consumers.get(node.output[0], [])
        return bool(readers) and all(float_layer(g, r) for r, _ in readers)
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
        return False
    weight = g.producer.get(node.input[1])
    return weight is None or weight.op_type != "DequantizeLinear"


def _per_tensor(g: Graph, q) -> bool:
    return len(q.input) > 2 and all(n in g.inits and int(np.prod(g.inits[n].dims)) == 1 for n in q.input[1:3])


def _grid_range(g: Graph, q) -> float:
    scale, zero = (numpy_helper.to_array(g.inits[n]) for n in q.input[1:3])
    info = np.iinfo(zero.dtype)
    return float(scale) * (int(info.max) - int(info.min))
