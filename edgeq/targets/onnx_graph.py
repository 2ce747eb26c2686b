"""Read an ONNX graph into `OpUse`s, the way an ONNX runtime sees its quantized ops.

QDQ is folded the way runtimes fuse it: a `DequantizeLinear` of a constant is the weight of the
op that consumes it (dtype, per-tensor / per-channel / `block_size` groups), a `DequantizeLinear`
of an activation makes the consumer's activations that integer dtype, `DynamicQuantizeLinear`
makes them `dynamic`, and a `QuantizeLinear` right after an op is folded into it. Q/DQ nodes left
over run on their own and are reported as such. Ops on constants only (an optimizer's bias
quantization: Mul, Div, Round, Cast) are folded when the runtime loads the file and are not reported.
Weights are never loaded (external data stays on disk). Needs the `onnx` package (host extra); this
module is imported only when checking ONNX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import EdgeqError
from .uses import OpUse, matmulnbits_fused

# Which input of an op is its weight; other ops have none unless fed a quantized constant.
WEIGHT_INPUT = {
    "MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "MatMulInteger": 1, "ConvInteger": 1,
    "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1, "QLinearMatMul": 3, "QLinearConv": 3,
    "QGemm": 3, "MatMulNBits": 1, "Gather": 0, "GatherBlockQuantized": 0, "LSTM": 1, "GRU": 1,
    "RNN": 1, "Attention": 1, "DynamicQuantizeLSTM": 1,
}
# Integer ops carrying a raw integer weight: the input whose length gives its granularity.
WEIGHT_QPARAM_INPUT = {"MatMulInteger": 3, "ConvInteger": 3, "DynamicQuantizeMatMul": 2, "QLinearMatMul": 4,
                       "QLinearConv": 4, "QGemm": 4, "MatMulIntegerToFloat": 3}
# Weight ops ONNX Runtime turns into an integer kernel only as a whole QDQ unit, their output quantized (QLinearConv,
# QGemm); without it they run in float on inputs and weights dequantized on every run. Measured (ORT 1.32): none of
# EfficientNet-Lite0's 49 w8a8 Convs (each followed by BatchNormalization) nor a classifier's Gemm became integer
# kernels, where MatMul fuses a dequantized input and weight on its own (MatMulIntegerToFloat). With the norms folded
# into the Convs (export/batchnorm.py), 34 of the 49 fuse: those whose output only QuantizeLinear reads.
OUTPUT_QDQ_OPS = {"Conv", "Gemm"}
# Runtimes that build a QDQ Conv / Gemm as an integer layer whatever reads its output: TensorRT's builder fuses the
# input and weight DequantizeLinear into an INT8 convolution with a float output when no QuantizeLinear follows, and
# fuses any Relu / Clip before one (TensorRT Developer Guide: Explicit Quantization, Q/DQ layer fusion).
ANY_OUTPUT_ENGINES = {"tensorrt"}
# Ops ORT removes between a layer and the QuantizeLinear of its output (ReluQuantFusion, ClipQuantFusion).
_QUANT_FUSED_ACTIVATIONS = {"Relu", "Clip"}
# Ops that quantize their own float activations on the fly.
DYNAMIC_OPS = {"DynamicQuantizeMatMul", "DynamicQuantizeLSTM"}
# Layout ops a runtime folds away when their data input is constant.
CONST_LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast"}
QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
FLOAT_TYPES = ("fp32", "fp16", "bf16")
# ORT's session option for the MatMulNBits it fuses from DQ + MatMul, and its default value.
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
ORT_DEFAULT_ACCURACY_LEVEL = 4


def _dtype_names() -> dict[int, str]:
    import onnx

    tp = onnx.TensorProto
    names = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "DOUBLE": "fp64", "INT8": "int8",
             "UINT8": "uint8", "INT4": "int4", "UINT4": "uint4", "INT2": "int2", "UINT2": "uint2",
             "INT16": "int16", "UINT16": "uint16", "INT32": "int32", "INT64": "int64", "UINT32": "uint32",
             "UINT64": "uint64", "BOOL": "bool", "STRING": "string"}
    return {getattr(tp, k): v for k, v in names.items() if hasattr(tp, k)}


class _Graph:
    def __init__(self, graph, dtypes: dict[int, str]):
        self.level = ORT_DEFAULT_ACCURACY_LEVEL
        self.engine = "onnxruntime"
        self.types: dict[str, str] = {}
        self.dims: dict[str, int] = {}
        self.numel: dict[str, int] = {}
        self.const: set[str] = set()
        self.scalars: dict[str, float] = {}  # one-element constants' values (scales, zero points, Clip bounds)
        for init in graph.initializer:
            self.types[init.name] = dtypes.get(init.data_type, "?")
            self.dims[init.name] = len(init.dims)
            self.numel[init.name] = _prod(init.dims)
            self.const.add(init.name)
            if self.numel[init.name] == 1:
                self.scalars[init.name] = _scalar(init)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.elem_type:
                self.types.setdefault(vi.name, dtypes.get(t.elem_type, "?"))
                if t.HasField("shape"):
                    self.dims.setdefault(vi.name, len(t.shape.dim))
        self.outputs = {o.name for o in graph.output}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                for out in node.output:
                    self.const.add(out)
                    for a in node.attribute:
                        if a.name == "value":
                            self.types[out] = dtypes.get(a.t.data_type, "?")
                            self.dims[out] = len(a.t.dims)
                            self.numel[out] = _prod(a.t.dims)
                            if self.numel[out] == 1:
                                self.scalars[out] = _scalar(a.t)
        # ops on constants only (an optimizer's bias quantization: Mul, Div, Round, Cast) are folded when ONNX Runtime
        # loads the file; DequantizeLinear is not (constant folding skips it), a constant one is a weight
        self.folded_at_load: set[str] = set()
        for node in graph.node:
            self._propagate(node, dtypes)
            if node.input and node.op_type not in QDQ and all((not i) or i in self.const for i in node.input):
                self.const.update(o for o in node.output if o)
                self.folded_at_load.add(_nid(node))
                if node.op_type in _VALUE_KEEPING and node.input[0] in self.scalars:  # ReLU6's bounds: Cast(constant)
                    self.scalars[node.output[0]] = self.scalars[node.input[0]]

    def _propagate(self, node, dtypes: dict[int, str]) -> None:
        """Give untyped outputs a dtype (shape inference stops at contrib ops such as MatMulNBits)."""
        attrs = {a.name: a for a in node.attribute}
        for k, out in enumerate(node.output):
            if not out or self.types.get(out, "?") != "?":
                continue
            if node.op_type == "Cast" and "to" in attrs:
                self.types[out] = dtypes.get(attrs["to"].i, "?")
            elif node.op_type in ("Shape", "Size"):
                self.types[out] = "int64"
            elif node.op_type in QDQ or k > 0:
                continue  # their output dtypes come from zero points / scales: leave unknown
            else:
                first = next((self.types.get(i, "?") for i in node.input if i), "?")
                self.types[out] = first

    def weight(self, name: str, seen: tuple = ()) -> tuple | None:
        """(dtype, granularity, group, folded nodes) when `name` is a constant weight, else None."""
        if name in self.const:
            return (self.types.get(name, "?"), None, None, seen)
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear" and node.input[0] in self.const:
            block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
            scale = node.input[1]
            per_tensor = self.numel.get(scale, 1) == 1
            gran = "group" if block else ("tensor" if per_tensor else "channel")
            return (self.types.get(node.input[0], "?"), gran, block or None, seen + (_nid(node),))
        if node.op_type in CONST_LAYOUT and node.input and all(
                i in self.const or i == node.input[0] for i in node.input if i):
            w = self.weight(node.input[0], seen + (_nid(node),))
            if w is not None and node.op_type == "Transpose" and w[2] and w[3]:
                # a blocked DequantizeLinear under a Transpose (a tied head on a table ORT cannot pack): ORT neither
                # moves the Transpose onto the integers nor fuses MatMulNBits; both run on every inference (measured)
                return None
            return w
        return None

    def act(self, name: str) -> tuple[str, tuple]:
        """The activation mode of a data input and the Q/DQ nodes folded to reach it."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in self.const:
            return self.types.get(node.input[0], "?"), (_nid(node),)
        if node is not None and node.op_type == "DynamicQuantizeLinear" and name == node.output[0]:
            return "dynamic", (_nid(node),)
        return self.types.get(name, "?"), ()


def _nid(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def load_model(path: str | Path):
    try:
        import onnx
    except ImportError:
        raise EdgeqError("checking .onnx files needs the onnx package (pip install 'edgeq[host]')") from None
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors vary; all mean a bad file
        raise EdgeqError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node or not model.opset_import:  # protobuf reads any few bytes (or none) as an empty model
        raise EdgeqError(f"{path}: not an ONNX model (no graph nodes or opset)")
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # contrib ops or missing external data: types from the file are enough
        pass
    return model


def accuracy_level(path: str | Path) -> int:
    """The MatMulNBits accuracy level a file will run at: from its FILE.json, else ORT's default (4)."""
    meta = Path(str(path) + ".json")
    try:
        config = json.loads(meta.read_text(encoding="utf-8")).get("session_config") or {}
        return int(config.get(ACCURACY_LEVEL_KEY, ORT_DEFAULT_ACCURACY_LEVEL))
    except (OSError, ValueError, AttributeError):
        return ORT_DEFAULT_ACCURACY_LEVEL


def onnx_uses(path: str | Path, level: int | None = None, engine: str = "onnxruntime") -> list[OpUse]:
    """Every op of the main graph (subgraphs of If/Loop are not walked) as an `OpUse`.

    `level`: the MatMulNBits accuracy level the session will use (default: `accuracy_level(path)`);
    4-bit blocked DequantizeLinear + MatMul, which ORT fuses into MatMulNBits, then runs with
    `dynamic` activations (level 4, int8 compute) or `fp32` ones (levels 0-1). `engine`: the runtime package
    whose fusion rules apply (ONNX Runtime's; TensorRT's for a Conv / Gemm whose output is not quantized).
    """
    model = load_model(path)
    g = _Graph(model.graph, _dtype_names())
    g.level = accuracy_level(path) if level is None else level
    g.engine = engine
    uses: list[OpUse] = []
    folded: set[str] = set()
    for node in model.graph.node:
        if node.op_type in QDQ or node.op_type == "Constant" or _nid(node) in g.folded_at_load:
            continue
        weight = g.weight(node.input[0]) if node.op_type in ("Shape", "Size") and node.input else None
        if weight:  # a weight's static shape (TF-style "same" padding reads it): folded at load, with its DequantizeLinear
            folded.update(weight[3])
            continue
        use = _node_use(g, node)
        if use is None:
            continue
        folded.update(use.folded)
        uses.append(use)
    for node in model.graph.node:
        if node.op_type in QDQ and _nid(node) not in folded:
            uses.append(_qdq_use(g, node))
    # Layout ops on constants that were folded into a weight are not ops at run time.
    return [u for u in uses if u.node not in folded]


def _node_use(g: _Graph, node) -> OpUse | None:
    inputs = [i for i in node.input]
    widx = WEIGHT_INPUT.get(node.op_type)
    weight = None
    if widx is not None and widx < len(inputs) and inputs[widx]:
        weight = g.weight(inputs[widx])
        if weight is not None and weight[0] in FLOAT_TYPES and not weight[3]:
            weight = (weight[0], None, None, ())
    if weight is None:
        # Any op fed a quantized constant carries it as its weight (e.g. DQ -> Mul).
        for i, name in enumerate(inputs):
            w = g.weight(name) if name else None
            if w is not None and w[1] is not None:
                widx, weight = i, w
                break
    if node.op_type in CONST_LAYOUT and g.weight(node.output[0]) is not None:
        return None  # part of a weight, folded at load time: not an op at run time
    if node.op_type == "Gather" and inputs[0] in g.const and weight and weight[0] not in FLOAT_TYPES:
        # integer rows looked up as they are (edgeq's 8-bit tables: the rows' scales dequantize them after), a copy
        return OpUse(op=node.op_type, act=weight[0], node=_nid(node))
    folded: tuple = weight[3] if weight else ()
    # a Conv's / Gemm's quantized bias is a constant DequantizeLinear, reported as its own use (TensorRT refuses int32)
    bias = g.weight(inputs[2]) if node.op_type in OUTPUT_QDQ_OPS and len(inputs) > 2 and inputs[2] else None
    act, vias, float_input = "none", (), False
    data = [(i, n) for i, n in enumerate(inputs) if n and i != widx and n not in g.const and not (i == 2 and bias)]
    for k, (_, name) in enumerate(data):
        mode, via = g.act(name)
        act = mode if k == 0 else act
        vias += via
        float_input = float_input or (not via and g.types.get(name) in FLOAT_TYPES)  # not a shape / index input
    # Weight ops fuse DQ inputs on their own (e.g. MatMulIntegerToFloat); other ops (and OUTPUT_QDQ_OPS) only as a
    # whole QDQ unit, every data input dequantized and the output quantized: otherwise the DQs run alone and the op runs
    # in float (measured, ORT 1.32: a QDQ Add one of whose inputs was another Add's float output stayed a float Add).
    whole_unit = node.op_type not in WEIGHT_INPUT or (node.op_type in OUTPUT_QDQ_OPS and g.engine not in ANY_OUTPUT_ENGINES)
    if vias and whole_unit and (float_input or not (_output_quantized(g, node) or _qgemm_float_output(g, node))):
        act = g.types.get(data[0][1], "fp32")
    else:
        folded += vias
    if node.op_type in DYNAMIC_OPS:
        act = "dynamic"
    wdtype, gran, group = (weight[0], weight[1], weight[2]) if weight else ("none", None, None)
    if weight and gran is None and node.op_type in WEIGHT_QPARAM_INPUT:
        q = WEIGHT_QPARAM_INPUT[node.op_type]
        qname = inputs[q] if q < len(inputs) else ""
        gran = "channel" if qname and g.numel.get(qname, 1) > 1 else "tensor"
    if node.op_type == "MatMul" and act == "fp32" and matmulnbits_fused(wdtype, gran, group):
        act = "dynamic" if g.level == 4 else "fp32"  # fused into MatMulNBits at the session's level
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a for a in node.attribute}
        bits = attrs["bits"].i if "bits" in attrs else 4
        has_zp = len(inputs) > 3 and bool(inputs[3])
        wdtype = f"{'uint' if has_zp else 'int'}{bits}"
        gran, group = "group", attrs["block_size"].i if "block_size" in attrs else None
        if "accuracy_level" in attrs and attrs["accuracy_level"].i == 4:
            act = "dynamic"
    # A QuantizeLinear right after the op is its output quantization (fused by QDQ runtimes).
    for out in node.output:
        for consumer in g.consumers.get(out, []):
            if consumer.op_type == "QuantizeLinear" and act not in (*FLOAT_TYPES, "none"):
                folded += (_nid(consumer),)
    return OpUse(op=node.op_type, act=act, weight=wdtype, granularity=gran, group_size=group,
                 node=_nid(node), folded=folded)


def _output_quantized(g: _Graph, node) -> bool:
    """Whether the op's output goes to QuantizeLinear nodes only, directly or after a Relu / Clip that ORT fuses away.
    ORT fuses no QDQ unit whose output something else also reads (EfficientNet-Lite0: a Conv feeding a residual Add
    and the next layer's QuantizeLinear stayed a float Conv)."""
    readers = [c for out in node.output for c in g.consumers.get(out, [])]
    return bool(readers) and not any(out in g.outputs for out in node.output) and all(
        c.op_type == "QuantizeLinear"
        or (c.op_type in _QUANT_FUSED_ACTIVATIONS and _output_quantized(g, c) and _activation_dropped(g, c)) for c in readers)


# Ops that pass a one-element constant's value on (a Cast between float types, or of an integral value).
_VALUE_KEEPING = CONST_LAYOUT - {"Transpose"}


def _activation_dropped(g: _Graph, node) -> bool:
    """Whether ORT drops a Relu / Clip before the QuantizeLinear nodes reading it (ReluQuantFusion / ClipQuantFusion):
    only when the activation clips nothing the quantization does not, its bounds covering the grid's range
    [(qmin - zp) * s, (qmax - zp) * s] (to float epsilon, as ORT compares). So a Relu goes before a uint8 grid with
    zero point 0 but not before a symmetric int8 grid (zero point 0: the negative half is on the grid), and ReLU6 only
    before a grid ending at 6. Measured (ORT 1.32): a QDQ Conv -> Relu -> QuantizeLinear fused into QLinearConv with a
    uint8 zero point of 0, stayed a float Conv with 128 or with an int8 zero point of 0; Clip(0, 6) before a uint8 grid
    reaching 25.5 stayed too."""
    eps = float(np.finfo(np.float32).eps)
    attrs = {a.name: a.f for a in node.attribute if a.name in ("min", "max")}  # Clip before opset 11
    bounds = [0.0 if node.op_type == "Relu" else attrs.get("min", -np.inf), attrs.get("max", np.inf)]
    for i in (1, 2):  # Clip's bounds as inputs (opset 11+)
        if node.op_type == "Clip" and len(node.input) > i and node.input[i]:
            bounds[i - 1] = g.scalars.get(node.input[i])
    low, high = bounds
    if low is None or high is None:
        return False  # a bound not known here: ORT needs it constant too
    for q in (c for out in node.output for c in g.consumers.get(out, [])):
        scale = g.scalars.get(q.input[1]) if len(q.input) > 1 else None
        zero_name = q.input[2] if len(q.input) > 2 and q.input[2] else None
        zero = 0 if zero_name is None else g.scalars.get(zero_name)
        dtype = "uint8" if zero_name is None else g.types.get(zero_name, "?")
        if scale is None or zero is None or dtype not in ("uint8", "int8", "uint16", "int16"):
            return False
        qmin, qmax = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        lower, upper = (float(np.float32(scale) * np.float32(q - zero)) for q in (qmin, qmax))  # ORT's float arithmetic
        if low - lower > eps or upper - high > eps:
            return False
    return True


def _scalar(tensor) -> float | None:
    """A one-element constant's value, None when its data is not in the file (external data is not loaded)."""
    from onnx import numpy_helper

    try:
        return float(numpy_helper.to_array(tensor).reshape(-1)[0])
    except Exception:  # external data not loaded, or not numeric
        return None


def _qgemm_float_output(g: _Graph, node) -> bool:
    """Whether ONNX Runtime fuses a QDQ Gemm whose output is float (QGemm has a float-output form): only when it has no
    bias or an int32 one behind a DequantizeLinear. Measured (ORT 1.32, a Gemm on DQ input and DQ int8 weights): a
    float bias kept it a float Gemm unless its output was quantized; no bias or an int32 bias gave QGemm either way."""
    if node.op_type != "Gemm":
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    bias = g.weight(node.input[2])
    return bias is not None and bias[0] == "int32" and bias[1] is not None


def _qdq_use(g: _Graph, node) -> OpUse:
    name = _nid(node)
    if node.op_type == "DequantizeLinear" and node.input[0] in g.const:
        w = g.weight(node.output[0])
        return OpUse(op=node.op_type, act="none", weight=w[0], granularity=w[1], group_size=w[2], node=name)
    return OpUse(op=node.op_type, act=g.types.get(node.input[0], "?"), node=name)
