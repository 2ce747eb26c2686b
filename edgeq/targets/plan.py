"""Turn a quantized-model directory's per-layer decisions (`QDIR/quant.json`) into `OpUse`s.

Before anything is exported, the plan already says which op each layer will become in a format:
a Linear is an ONNX MatMul / a TFLite FULLY_CONNECTED, a Conv a Conv / CONV_2D, an Embedding a
Gather / GATHER; weight bits + symmetry give the dtype, granularity and group size the grouping,
the activation mode the `act` (weight-only layers are `fp32` in ONNX, `dynamic` in TFLite, where
edgeq exports them as dynamic-range ops). Static activations are uint8 in ONNX (ORT fuses integer MatMul only
for uint8) and int8 in TFLite, as docs/architecture.md fixes; symmetric static activations are int8
in ONNX too (zero point 0, what TensorRT requires).

quant.json layers are read leniently (a list of tables with `name`, or a table keyed by name;
weight fields flat or under `weight`, activation as a string or a table with `mode`), because the
writer evolves; unknown layer shapes are an error naming the layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EdgeqError
from .profile import KIND_OPS
from .uses import RECIPE_ACT_MODES, OpUse, matmulnbits_fused, onnx_dynamic_form, onnx_packed_table, op_act

_KINDS = {"linear": "linear", "conv": "conv", "conv1d": "conv", "conv2d": "conv", "embedding": "embedding",
          "matmul": "linear", "dense": "linear", "fully_connected": "linear", "gather": "embedding"}


def read_plan(qdir_or_json: str | Path | dict) -> tuple[list[dict], str]:
    """The per-layer decisions of a QDIR (or of a quant.json path or already-parsed dict), and the model's kind
    (causal-lm, encoder, image, or "" when quant.json does not say)."""
    if isinstance(qdir_or_json, dict):
        data, where = qdir_or_json, "quant.json"
    else:
        path = Path(qdir_or_json)
        if path.is_dir():
            path = path / "quant.json"
        if not path.is_file():
            raise EdgeqError(f"{path}: no quant.json (is {path.parent} a quantized-model directory?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeqError(f"{path}: not readable JSON ({exc})") from None
        where = str(path)
    layers = data.get("layers") if isinstance(data, dict) else None
    if isinstance(layers, dict):
        layers = [{"name": k, **v} for k, v in layers.items()]
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise EdgeqError(f"{where}.layers: expected a list or table of per-layer decisions")
    return layers, str(data.get("kind") or "")


def _act_mode(layer: dict) -> tuple[str, int, bool, str]:
    """(mode, bits, symmetric, granularity) of a layer's input grid."""
    act = layer.get("activation", layer.get("act", "none"))
    if isinstance(act, dict):
        return (str(act.get("mode", "none")), int(act.get("bits", 8)), bool(act.get("symmetric", False)),
                str(act.get("granularity") or "tensor"))
    return str(act or "none"), 8, False, "tensor"


def container_bits(bits: int, fmt: str) -> int:
    """The storage width a `bits`-bit weight is exported in: ONNX has INT4 and INT8 containers
    (2- and 3-bit values live in INT4), TFLite INT2, INT4 and INT8."""
    if bits <= 2 and fmt == "tflite":
        return 2
    return 4 if bits <= 4 else 8


def layer_use(layer: dict, fmt: str, where: str = "quant.json", accuracy_level: int = 0, model_kind: str = "") -> OpUse:
    """The op one layer becomes in `fmt` (onnx|tflite); ONNX at MatMulNBits `accuracy_level` (edgeq's export pins 0).

    `model_kind` (quant.json's `kind`): an image model's linear layers read 2-D inputs (a classifier after pooling),
    which the ONNX exporter writes as Gemm, every other model's as MatMul.
    """
    name = str(layer.get("name", "?"))
    at = f"{where}.layers[{name}]"
    kind = _KINDS.get(str(layer.get("kind", layer.get("type", "linear"))).lower())
    if kind is None:
        raise EdgeqError(f"{at}.kind: {layer.get('kind', layer.get('type'))!r} is not one of: linear, conv, embedding")
    op = "Gemm" if fmt == "onnx" and kind == "linear" and model_kind == "image" else KIND_OPS[fmt][kind][0]
    shape = layer.get("shape") or ()
    if fmt == "tflite" and kind == "conv" and len(shape) == 4 and shape[1] == 1 and shape[0] > 1:
        op = "DEPTHWISE_CONV_2D"  # [out, in / groups = 1, kh, kw]: one input channel per output channel (a conv of a
        # single-channel input reads the same; the converter writes a depthwise conv so)
    w: dict[str, Any] = layer.get("weight", layer) if isinstance(layer.get("weight"), dict) else layer
    bits = w.get("bits", w.get("weight_bits"))
    if bits is None or layer.get("skip") or layer.get("quantized") is False or int(bits) >= 16:
        return OpUse(op=op, act="fp32", weight="fp32", node=name)
    symmetric = bool(w.get("symmetric", True))
    signed = symmetric or fmt == "tflite"
    dtype = f"{'int' if signed else 'uint'}{container_bits(int(bits), fmt)}"
    gran = str(w.get("granularity", "channel"))
    gran = "group" if gran in ("group", "block") else gran
    group = w.get("group_size") if gran == "group" else None
    if gran not in ("tensor", "channel", "group"):
        raise EdgeqError(f"{at}.granularity: {gran!r} is not one of: tensor, channel, group")
    mode, abits, act_sym, act_gran = _act_mode(layer)
    mode = "none" if mode in ("float", "fp32") else mode
    if mode not in RECIPE_ACT_MODES:
        raise EdgeqError(f"{at}.activation.mode: {mode!r} is not one of: {', '.join(RECIPE_ACT_MODES)}")
    act = op_act(mode, fmt, abits, act_sym)
    if fmt == "onnx" and mode == "dynamic" and onnx_dynamic_form(
            op == "MatMul", int(bits), group, abits, act_sym, act_gran) != "integer":
        act = "fp32"  # the grid is float ops (or DynamicQuantizeLinear -> DequantizeLinear) before the op: it reads floats
    packed = fmt == "onnx" and bool(shape) and onnx_packed_table(int(bits), symmetric, group, int(shape[-1]))
    if fmt == "onnx" and kind == "embedding":
        return _onnx_table_use(name, dtype, gran, group, packed)
    if fmt == "onnx" and layer.get("tied_to"):
        # a tied head reads the table's integers (a packed table: as MatMulNBits), its input grid float ops before it
        group_size = int(group) if group else None
        if not packed and matmulnbits_fused(dtype, gran, group_size):
            # blocks ORT cannot pack: read through DequantizeLinear + Transpose, which ORT does not fuse into
            # MatMulNBits, so the whole table is dequantized on every run
            return OpUse(op="DequantizeLinear", act="none", weight=dtype, granularity=gran, group_size=group_size, node=name)
        return OpUse(op="MatMulNBits" if packed else op, act="fp32", weight=dtype, granularity=gran,
                     group_size=group_size, node=name)
    if fmt == "onnx" and kind == "linear" and act == "fp32" and accuracy_level == 4 and matmulnbits_fused(dtype, gran, group):
        act = "dynamic"  # fused into MatMulNBits, whose level 4 quantizes a float input again (int8 per block)
    return OpUse(op=op, act=act, weight=dtype, granularity=gran, group_size=int(group) if group else None, node=name)


def _onnx_table_use(name: str, dtype: str, gran: str, group: int | None, packed: bool) -> OpUse:
    """An embedding table as edgeq's ONNX export looks it up (onnx_quant._render_embedding)."""
    if packed:  # ONNX Runtime's packed 4-bit blocks: only the looked-up rows dequantized
        return OpUse(op="GatherBlockQuantized", act="int64", weight=dtype, granularity=gran, group_size=group, node=name)
    if dtype.endswith("8") and gran != "group":  # the integer rows themselves, dequantized after the lookup
        return OpUse(op="Gather", act=dtype, node=name)
    return OpUse(op="Gather", act="int64", weight=dtype, granularity=gran, group_size=group, node=name)  # a DQ of the table


def plan_uses(qdir_or_json: str | Path | dict, fmt: str, accuracy_level: int = 0) -> list[OpUse]:
    """Every layer of a QDIR's plan as the `OpUse` it becomes when exported to `fmt`.

    ONNX: as edgeq's export renders it at MatMulNBits `accuracy_level` (0 unless asked otherwise).
    """
    if fmt not in KIND_OPS:
        raise EdgeqError(f"format: {fmt!r} is not one of: {', '.join(KIND_OPS)}")
    where = str(qdir_or_json) if not isinstance(qdir_or_json, dict) else "quant.json"
    layers, model_kind = read_plan(qdir_or_json)
    return [layer_use(layer, fmt, where, accuracy_level, model_kind) for layer in layers]
