"""Output grids for an ONNX int8 file's Convs and Gemms (`export(..., output_grids=True)`; pure onnx + numpy + ORT).

ONNX Runtime runs a QDQ Conv / Gemm on its integer kernel (QLinearConv / QGemm) only when QuantizeLinear nodes are
all that read its output. edgeq's simulation quantizes each layer's input, so a Conv whose output also reaches a
float op (a residual Add, a pooling) stays a float Conv on a weight dequantized every run: 15 of EfficientNet-
Lite0's 49. With output grids, such an output (after the Relu / Clip ORT drops into the kernel) gets a
QuantizeLinear -> DequantizeLinear of its own, uint8 on a min/max grid calibrated by running the file on calibration
inputs, as ORT's quantize_static calibrates every tensor and as edgeq's TFLite int8 files requantize every layer's
output. It is a departure from the simulation, which FILE.json's `parity` measures and `output_grids` records.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_edit import Graph, output_readers, static_qdq_layers


def outputs_needing_grids(model: onnx.ModelProto) -> dict[str, bool]:
    """The tensors to quantize: the output of each static QDQ Conv / Gemm (after a Relu / Clip that is its only reader)
    that something besides QuantizeLinear reads, -> whether its grid is symmetric int8 (the layer's input grid is: the
    `w8a8-sym` form, TensorRT's) rather than uint8; graph outputs (logits) stay float."""
    g = Graph(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    found = {}
    for node, x, _ in static_qdq_layers(g):
        t, readers = output_readers(g, node, graph_outputs)
        if t in graph_outputs or not readers or all(r.op_type == "QuantizeLinear" for r in readers):
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
            node.input[i] = dq
        g.emit_after_producer(t, [helper.make_node("QuantizeLinear", [t, s, z], [q], name=g.unique(f"{t}/output_q")),
                                  helper.make_node("DequantizeLinear", [q, s, z], [dq], name=g.unique(f"{t}/output_dq"))])
    g.commit()
