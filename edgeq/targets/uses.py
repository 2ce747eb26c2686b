"""OpUse: one op as a runtime sees it (op name, activation mode, weight dtype, granularity, group).

Every reader (ONNX graph, TFLite flatbuffer, quant.json plan) turns its input into a list of
`OpUse`s; profiles classify `OpUse`s. The few rules of how edgeq's ONNX export renders a layer
(`onnx_dynamic_form`, `onnx_packed_table`) live here too, so the exporter and the plan share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CANDIDATE_GROUP_SIZES = (16, 32, 64, 128, 256)

_BITS = {"int2": 2, "uint2": 2, "int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16,
         "fp16": 16, "bf16": 16, "fp32": 32, "none": 0}


@dataclass(frozen=True)
class OpUse:
    """One op occurrence. `act`: fp32/fp16/int8/uint8/dynamic/int64...; `weight`: dtype or 'none'."""

    op: str
    act: str
    weight: str = "none"
    granularity: str | None = None
    group_size: int | None = None
    node: str = ""
    folded: tuple[str, ...] = field(default=(), compare=False)

    @property
    def weight_bits(self) -> int:
        return _BITS.get(self.weight, 0)

    @property
    def signature(self) -> str:
        """The dtype signature used to aggregate a report, e.g. `act=fp32 w=int4/g32`."""
        if self.weight == "none":
            return f"act={self.act}"
        gran = {"tensor": "/tensor", "channel": "/channel", "group": f"/g{self.group_size}", None: ""}
        return f"act={self.act} w={self.weight}{gran.get(self.granularity, '')}"

    def to_dict(self) -> dict:
        return {"op": self.op, "act": self.act, "weight": self.weight, "granularity": self.granularity,
                "group_size": self.group_size, "node": self.node}


RECIPE_ACT_MODES = ("none", "dynamic", "static")


def _nbits_block(group_size: int | None) -> bool:
    """A block size ONNX Runtime's n-bit kernels take: a power of two, at least 16."""
    return bool(group_size) and group_size >= 16 and not group_size & (group_size - 1)


def matmulnbits_fused(weight: str, granularity: str | None, group_size: int | None) -> bool:
    """Whether ONNX Runtime fuses this weight's DequantizeLinear -> MatMul into MatMulNBits (4-bit blocks),
    which then runs at the session's accuracy level."""
    return weight in ("int4", "uint4") and granularity == "group" and _nbits_block(group_size)


def onnx_packed_table(bits: int, symmetric: bool, group_size: int | None, width: int) -> bool:
    """Whether edgeq's ONNX export stores an embedding table as ONNX Runtime's packed 4-bit blocks (symmetric, at most
    4 bits, blocks dividing the row): looked up with com.microsoft.GatherBlockQuantized (only the looked-up rows
    dequantized) and read by a tied head as com.microsoft.MatMulNBits, one copy for both."""
    return bits <= 4 and symmetric and _nbits_block(group_size) and width % group_size == 0


def onnx_dynamic_form(matmul: bool, bits: int, group_size: int | None, act_bits: int, act_symmetric: bool,
                      act_granularity: str) -> str:
    """How edgeq's ONNX export renders a layer's dynamic input grid (edgeq/export/onnx_quant.py reads this too).

    `integer`: integer ops and MatMulInteger (an 8-bit grid on a MatMul with per-channel or
    per-tensor weights of at most 8 bits); otherwise `float`: the grid computed with float ops, so
    the layer's op reads float values that lie on it (per token, fewer than 8 bits, symmetric, or
    weights in blocks or of at most 4 bits: ONNX Runtime fuses a blocked 4-bit DequantizeLinear ->
    MatMul into MatMulNBits only after a float input); else `dequantize`: DynamicQuantizeLinear ->
    DequantizeLinear, then the float op (per tensor, 8-bit asymmetric, on Conv or Gemm).
    """
    if matmul and act_bits == 8 and group_size is None and bits <= 8:
        return "integer"
    if act_granularity == "token" or act_bits != 8 or act_symmetric or group_size is not None or bits <= 4:
        return "float"
    return "dequantize"


def op_act(mode: str, fmt: str, bits: int = 8, symmetric: bool = False) -> str:
    """The `act` a recipe activation mode (none | dynamic | static) becomes when exported to `fmt`.

    Weight-only (`none`) is fp32 in ONNX (DequantizeLinear + MatMul) and `dynamic` in TFLite, where
    edgeq exports it as ai-edge-quantizer dynamic-range ops; static is uint8 in ONNX (int8 when
    symmetric) and int8 in TFLite (docs/architecture.md).
    """
    if mode == "none":
        return "dynamic" if fmt == "tflite" else "fp32"
    if mode == "dynamic":
        return "dynamic"
    if mode == "static":
        return "int16" if bits == 16 else ("uint8" if fmt == "onnx" and not symmetric else "int8")
    return mode  # already an op-level act (fp32, int8, ...)


def recipe_name(weight: str, granularity: str | None, group_size: int | None, act: str, fmt: str = "") -> str:
    """A short recipe name in edgeq's grammar: w<bits>[-g<N>|-t][a8[-sym]|a16|-dyn].

    `w8` 8-bit per-channel weights, float activations; `w4-g32` 4-bit weights in groups of 32;
    `w8a8` static 8-bit activations (uint8 in ONNX, int8 in TFLite); `w8a8-sym` static symmetric
    int8 activations in ONNX (zero point 0, what TensorRT needs); `w8-dyn` dynamic activations.
    """
    if weight in ("none", "fp32", "fp16", "bf16"):
        return "float"
    name = f"w{_BITS[weight]}"
    if granularity == "group" and group_size:
        name += f"-g{group_size}"
    elif granularity == "tensor":
        name += "-t"
    if act == "uint8" or (act == "int8" and fmt != "onnx"):
        name += "a8"
    elif act == "int8":
        name += "a8-sym"
    elif act == "int16":
        name += "a16"
    elif act == "dynamic":
        name += "-dyn"
    return name
