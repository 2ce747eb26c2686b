"""Read a TFLite flatbuffer into `OpUse`s with the generated schema reader LiteRT ships.

No interpreter is created and no tensor data is copied: the op codes, tensor types and
quantization parameters are read straight from the flatbuffer. A float op with a constant integer
weight (FULLY_CONNECTED, CONV_2D, BATCH_MATMUL, ...) is the hybrid / dynamic-range kernel (`act =
dynamic`); a DEQUANTIZE of a constant is folded into its consumer as that consumer's weight.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import EdgeqError
from .uses import OpUse

# Generated readers of the TFLite schema, in the order tried; all expose the same classes.
SCHEMA_MODULES = ("ai_edge_litert.schema_py_generated", "litert_converter.schema_py_generated",
                  "tflite_runtime.schema_py_generated", "tensorflow.lite.python.schema_py_generated",
                  "tflite")
# Which input of an op is its weight.
WEIGHT_INPUT = {"FULLY_CONNECTED": 1, "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "TRANSPOSE_CONV": 1,
                "CONV_3D": 1, "BATCH_MATMUL": 1, "EMBEDDING_LOOKUP": 1, "GATHER": 0,
                "UNIDIRECTIONAL_SEQUENCE_LSTM": 2, "LSTM": 2, "DEQUANTIZE": 0}
# Ops whose float-input + integer-weight form quantizes the input on the fly (hybrid kernels).
HYBRID_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "BATCH_MATMUL",
              "UNIDIRECTIONAL_SEQUENCE_LSTM", "LSTM"}
FLOATS = ("fp32", "fp16", "bf16")


def schema():
    """The first importable generated TFLite schema module (see SCHEMA_MODULES)."""
    for name in SCHEMA_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "Model"):
            return mod
    raise EdgeqError("tflite: reading .tflite files needs ai-edge-litert (pip install 'edgeq[agent]')")


def _names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


_DTYPES = {"FLOAT32": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "FLOAT64": "fp64", "INT8": "int8",
           "UINT8": "uint8", "INT4": "int4", "UINT4": "uint4", "INT2": "int2", "INT16": "int16",
           "UINT16": "uint16", "INT32": "int32", "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64",
           "BOOL": "bool", "STRING": "string"}


def tflite_uses(path: str | Path) -> list[OpUse]:
    """Every op of every subgraph as an `OpUse` (node = `subgraph:index:first-output-name`)."""
    s = schema()
    path = Path(path)
    buf = path.read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise EdgeqError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = s.Model.GetRootAs(buf, 0)
        _check_buffers(model, len(buf), path)
        return _read(s, model)
    except EdgeqError:
        raise
    except Exception as exc:  # a truncated or corrupt flatbuffer raises anything
        raise EdgeqError(f"{path}: cannot read the TFLite flatbuffer ({type(exc).__name__}: {exc})") from None


def _check_buffers(model, size: int, path: Path) -> None:
    """Every constant's bytes lie inside the file: a truncated file (its tail of weights missing) parses otherwise."""
    for i in range(model.BuffersLength()):
        b = model.Buffers(i)
        inline = b.DataLength() and len(b.DataAsNumpy()) == b.DataLength()  # numpy refuses bytes past the end
        if b.Offset() + b.Size() > size or b.DataLength() and not inline:
            raise EdgeqError(f"{path}: truncated TFLite file (constant buffer {i} ends past its {size} bytes)")


def _read(s, model) -> list[OpUse]:
    ops = _names(s.BuiltinOperator)
    types = _names(s.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        custom = oc.CustomCode()
        codes.append(custom.decode() if code == s.BuiltinOperator.CUSTOM and custom else ops.get(code, str(code)))
    uses: list[OpUse] = []
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        tensors = [sg.Tensors(t) for t in range(sg.TensorsLength())]
        producer = {}
        for oi in range(sg.OperatorsLength()):
            op = sg.Operators(oi)
            for k in range(op.OutputsLength()):
                producer[op.Outputs(k)] = (oi, codes[op.OpcodeIndex()], op)

        def is_const(t: int) -> bool:
            b = tensors[t].Buffer()
            if b <= 0 or b >= model.BuffersLength():
                return False
            buffer = model.Buffers(b)
            return buffer.DataLength() > 0 or buffer.Offset() > 1

        def dtype(t: int) -> str:
            name = types.get(tensors[t].Type(), "?")
            return _DTYPES.get(name, name.lower())

        def weight(t: int):
            if t < 0:
                return None
            if is_const(t):
                return (dtype(t), *_granularity(s, tensors[t]), ())
            prod = producer.get(t)
            if prod and prod[1] == "DEQUANTIZE":
                src = prod[2].Inputs(0)
                if src >= 0 and is_const(src):
                    return (dtype(src), *_granularity(s, tensors[src]), (f"{si}:{prod[0]}",))
            return None

        dequant_folded: set[str] = set()
        pending = []
        for oi in range(sg.OperatorsLength()):
            op = sg.Operators(oi)
            name = codes[op.OpcodeIndex()]
            inputs = [op.Inputs(k) for k in range(op.InputsLength())]
            widx = WEIGHT_INPUT.get(name)
            w = weight(inputs[widx]) if widx is not None and widx < len(inputs) else None
            act = "none"
            for k, t in enumerate(inputs):
                if t >= 0 and k != widx and not is_const(t):
                    act = dtype(t)
                    break
            wdtype, gran, group, via = w if w else ("none", None, None, ())
            if w and wdtype in FLOATS and not via:
                gran, group = None, None
            if name in HYBRID_OPS and act in FLOATS and wdtype not in FLOATS + ("none",) and not via:
                act = "dynamic"
            dequant_folded.update(via)
            out = tensors[op.Outputs(0)].Name().decode() if op.OutputsLength() and op.Outputs(0) >= 0 else ""
            pending.append((f"{si}:{oi}", OpUse(op=name, act=act, weight=wdtype, granularity=gran,
                                                 group_size=group, node=f"{si}:{oi}:{out}", folded=via)))
        uses += [u for key, u in pending if key not in dequant_folded]
    return uses


def _granularity(s, tensor) -> tuple[str | None, int | None]:
    q = tensor.Quantization()
    if q is None:
        return None, None
    if q.DetailsType() == getattr(getattr(s, "QuantizationDetails", None), "BlockwiseQuantization", -1):
        table = q.Details()
        bq = s.BlockwiseQuantization()
        bq.Init(table.Bytes, table.Pos)
        return "group", int(bq.BlockSize())
    n = q.ScaleLength()
    if n == 0:
        return None, None
    return ("tensor" if n == 1 else "channel"), None
