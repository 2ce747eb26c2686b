"""Read a quantized TFLite flatbuffer back and compare its integers and scales with edgeq's, per layer.

This is the proof behind `exact: true`: each layer's weight tensor (the weight input of the op whose
output is labelled `edgeq/<layer>`; a tied head's is its embedding table; a layer fused with its siblings by
`tflite_fuse`, its rows of the fused weight, found through the SLICE of its output) must hold edgeq's integers
in TFLite's layout, its scales must equal edgeq's float32 scales bit for bit (blockwise scales are
stored as fp16 and compared after widening), zero points must be 0, and a static layer's input
tensor must carry the layer's activation grid as int8 (zp - 128).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..quantize.modules import QuantEmbedding, QuantLinear
from .tflite_flatbuffer import buffer_bytes, op_names, read_model, schema


def _int_layout(module) -> np.ndarray:
    """edgeq's integers in TFLite's weight layout."""
    q = module.qweight.detach().to(torch.int16).numpy()
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return q
    shape = module.decision.shape  # [out, in/groups, kh, kw]
    q = q.reshape(shape)
    if module.conv_args["groups"] == 1:
        return q.transpose(0, 2, 3, 1)
    return q.transpose(1, 2, 3, 0)


def _unpack_int4(raw: np.ndarray, n: int) -> np.ndarray:
    """TFLite packs int4 two per byte, low nibble first."""
    b = raw.astype(np.int16)
    q = np.stack([b & 0xF, (b >> 4) & 0xF], axis=-1).reshape(-1)[:n]
    return np.where(q >= 8, q - 16, q)


def _tensor_ints(model_t, tensor, buf: bytes) -> np.ndarray | None:
    s = schema()
    raw = buffer_bytes(model_t, tensor.buffer, buf)
    if raw is None:
        return None
    n = int(np.prod(tensor.shape))
    if tensor.type == s.TensorType.INT8:
        return raw.view(np.int8).astype(np.int16).reshape(tuple(tensor.shape))
    if tensor.type == s.TensorType.INT4:
        return _unpack_int4(raw, n).reshape(tuple(tensor.shape))
    return None


def _fp16_scales(model_t, sg, index: int, buf: bytes) -> np.ndarray:
    t = sg.tensors[index]
    raw = buffer_bytes(model_t, t.buffer, buf)
    dtype = np.float16 if t.type == schema().TensorType.FLOAT16 else np.float32
    return raw.view(dtype).astype(np.float32).reshape(tuple(t.shape))


def read_back(buf: bytes, layers: dict, scales: dict | None = None, zeroed: dict | None = None) -> dict:
    """Per-layer comparison; returns {"exact": bool, "layers": {name: {...}}, "mismatches": [...]}.

    `scales` overrides the scales expected for some layers (a conv with a folded BatchNorm holds
    edgeq's scales times the norm's factor); by default every layer must hold edgeq's own. `zeroed`: a layer's
    output channels rendered with zero integers (a folded norm's dead channels, `batchnorm.BnFold.dead`). A file
    with several signatures (prefill and decode) is checked in each subgraph.
    """
    from .tflite_graph import labelled

    model_t = read_model(buf)
    codes = op_names(model_t)
    tensors: dict[str, list] = {}
    consumers = {}
    for sg in model_t.subgraphs:
        producer = {int(op.outputs[0]): op for op in sg.operators if op.outputs is not None and len(op.outputs)}
        for op in sg.operators:
            if len(op.inputs) > 1 and op.inputs[1] >= 0:
                consumers[(id(sg), op.inputs[1])] = (op, codes[op.opcodeIndex])
                out = labelled(sg.tensors[op.outputs[0]].name) if op.outputs and op.outputs[0] >= 0 else None
                if out is None or out[1]:
                    continue
                fused = producer.get(int(op.inputs[0])) if codes[op.opcodeIndex] == "SLICE" else None
                if fused is not None and codes[fused.opcodeIndex] == "FULLY_CONNECTED":
                    # a layer fused with its siblings (`tflite_fuse`): its rows of the fused weight
                    start = int(buffer_bytes(model_t, sg.tensors[op.inputs[1]].buffer, buf).view(np.int32)[-1])  # begin
                    rows = (start, start + int(sg.tensors[op.outputs[0]].shape[-1]))
                    tensors.setdefault(out[0], []).append((sg, fused.inputs[1], rows))
                else:  # the layer's op: its weight (a tied head's is the embedding table)
                    tensors.setdefault(out[0], []).append((sg, op.inputs[1], None))
    report, mismatches = {}, []
    for name, m in layers.items():
        d = m.decision
        entry = {"bits": d.weight.bits, "granularity": d.weight.granularity}
        found = tensors.get(name)
        if not found:
            mismatches.append(f"{name}: weight tensor not found")
            report[name] = {**entry, "ints": False, "scales": False}
            continue
        edgeq_scale = (scales or {}).get(name, m.scale).detach().to(torch.float32).numpy()
        dead = (zeroed or {}).get(name) or []
        checks = [_check(model_t, sg, ti, m, edgeq_scale, consumers, buf, rows, dead) for sg, ti, rows in found]
        entry.update(checks[0])
        if dead:
            entry["rescaled_channels"] = list(dead)
        if len(checks) > 1:
            entry["subgraphs"] = len(checks)
        for key in ("ints", "scales", "act"):
            bad = [i for i, c in enumerate(checks) if c.get(key) is False]
            if bad:
                mismatches.append(f"{name}: {key} differ" + (f" (subgraph {bad[0]})" if len(checks) > 1 else ""))
                entry[key] = False
        report[name] = entry
    return {"exact": not mismatches, "layers": report, "mismatches": mismatches}


def _check(model_t, sg, ti, m, edgeq_scale: np.ndarray, consumers: dict, buf: bytes, rows: tuple | None = None,
           zeroed: list = ()) -> dict:
    """One weight tensor of layer `m` against edgeq's integers, scales (and static input grid); `rows`: the layer's
    rows [start, stop) of a fused weight; `zeroed`: output channels expected to hold zeros."""
    s = schema()
    d = m.decision
    t = sg.tensors[ti]
    ints = _tensor_ints(model_t, t, buf)
    cut = slice(None) if rows is None else slice(*rows)
    if ints is not None:
        ints = ints[cut]
    want = _int_layout(m)
    if len(zeroed):  # TFLite's conv layout has the output channels first, a depthwise conv's last
        want = want.copy()
        depthwise = want.ndim == 4 and m.conv_args["groups"] != 1
        want[(..., list(zeroed)) if depthwise else list(zeroed)] = 0
    qp = t.quantization
    if np.any(edgeq_scale < 0):  # a folded negative BatchNorm gain: TFLite holds |scale| and negated integers
        sign = np.sign(edgeq_scale[:, 0]).astype(np.int16)
        depthwise = want.ndim == 4 and m.conv_args["groups"] != 1
        want = want * (sign.reshape(1, 1, 1, -1) if depthwise else sign.reshape((-1,) + (1,) * (want.ndim - 1)))
        edgeq_scale = np.abs(edgeq_scale)
    entry = {"tflite_type": {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}.get(t.type),
             "ints": bool(ints is not None and ints.shape == want.shape and np.array_equal(ints, want))}
    if rows is not None:
        entry["fused_rows"] = [int(rows[0]), int(rows[1])]
    if qp is not None and qp.detailsType == s.QuantizationDetails.BlockwiseQuantization:
        det = qp.details
        got = _fp16_scales(model_t, sg, det.scales, buf)[cut]
        entry["block_size"] = int(det.blockSize)
        entry["scale_storage"] = "fp16 (bf16 precision)"
        zp_ok = det.zeroPoints in (-1, 0) or not np.any(_fp16_scales(model_t, sg, det.zeroPoints, buf))
        entry["scales"] = bool(got.shape == edgeq_scale.shape and np.array_equal(got, edgeq_scale) and zp_ok
                               and det.blockSize == d.weight.group_size)
    elif qp is not None and qp.scale is not None:
        got = np.asarray(qp.scale, dtype=np.float32)[cut]
        want_s = edgeq_scale[:1, 0] if d.weight.granularity == "tensor" else edgeq_scale[:, 0]
        zps = np.asarray(qp.zeroPoint if qp.zeroPoint is not None else [0])[cut]
        entry["scale_storage"] = "fp32"
        entry["scales"] = bool(got.shape == want_s.shape and np.array_equal(got.view(np.uint32), want_s.view(np.uint32))
                               and not np.any(zps))
    else:
        entry["scales"] = False
    if d.activation.mode == "static":
        entry["act"] = _act_matches(model_t, sg, consumers, ti, m)
    return entry


def _act_matches(model_t, sg, consumers, weight_index, m) -> bool:
    op, _ = consumers.get((id(sg), weight_index), (None, None))
    if op is None:
        return False
    qp = sg.tensors[op.inputs[0]].quantization
    if qp is None or qp.scale is None or len(qp.scale) != 1:
        return False
    s = np.float32(m.act_scale.item())
    a = m.decision.activation
    # int16 (16x8): symmetric, zero point 0; int8: edgeq's uint8 zero point - 128
    z, kind = (0, schema().TensorType.INT16) if a.bits == 16 else (int(m.act_zero_point.item()) - 128, schema().TensorType.INT8)
    return bool(np.float32(qp.scale[0]).view(np.uint32) == s.view(np.uint32) and int(qp.zeroPoint[0]) == z
                and sg.tensors[op.inputs[0]].type == kind)


def output_grids(buf: bytes, layers: dict, signature: str = "serving_default") -> dict[str, tuple[float, float, float]]:
    """Each layer's output grid in a full-integer file, read from `signature`'s subgraph: (lowest, highest real value
    its int8 output tensor holds (int16 in a 16x8 layer), step). Layers whose output is float are left out."""
    from .tflite_graph import layer_ops

    s = schema()
    model_t = read_model(buf)
    sig = next((d for d in model_t.signatureDefs if d.signatureKey == signature.encode()), None)
    wanted = model_t.subgraphs[sig.subgraphIndex if sig is not None else 0]
    limits = {s.TensorType.INT8: (-128, 127), s.TensorType.INT16: (-32768, 32767)}
    out = {}
    for name, placed in layer_ops(model_t, layers).items():
        for sg, op in placed:
            t = sg.tensors[op.outputs[0]]
            qp = t.quantization
            if sg is wanted and t.type in limits and qp is not None and qp.scale is not None and len(qp.scale) == 1:
                (qmin, qmax), step, z = limits[t.type], float(qp.scale[0]), int(qp.zeroPoint[0])
                out[name] = ((qmin - z) * step, (qmax - z) * step, step)
    return out


@contextlib.contextmanager
def output_clipping(layers: dict, grids: dict[str, tuple[float, float, float]]):
    """Count, over the forwards run inside the block, each layer's outputs (float in the simulation) that its file's
    output grid (`output_grids`) cannot hold: further than half a step beyond either end, where TFLite saturates
    them. Yields a dict that, once the block ends, maps each layer with any such value to {"values" (how many), "of"
    (of how many), "grid" [lowest, highest], "seen" [min, max] (the simulation's)}, the largest fraction first."""
    found: dict[str, dict] = {}

    def hook(name):
        lo, hi, step = grids[name]

        def count(module, args, output):
            y = output.detach()
            n = int(((y < lo - step / 2) | (y > hi + step / 2)).sum())
            entry = found.setdefault(name, {"values": 0, "of": 0, "grid": [lo, hi], "seen": [float("inf"), float("-inf")]})
            entry["values"] += n
            entry["of"] += y.numel()
            entry["seen"] = [min(entry["seen"][0], float(y.min())), max(entry["seen"][1], float(y.max()))]
        return count

    handles = [layers[name].register_forward_hook(hook(name)) for name in grids if name in layers]
    clipped: dict[str, dict] = {}
    try:
        yield clipped
    finally:
        for h in handles:
            h.remove()
        ranked = sorted(((n, e) for n, e in found.items() if e["values"]), key=lambda item: -item[1]["values"] / item[1]["of"])
        clipped.update(ranked)


@contextlib.contextmanager
def output_rounding(layers: dict, grids: dict[str, tuple[float, float, float]]):
    """Inside the block, each layer's output (float in the simulation) is put on its file's output grid
    (`output_grids`): rounded to the grid's step and saturated at its ends, as a full-integer file requantizes it.
    The one rounding such a file adds to the simulation, whose other ops stay float in the file too
    (`tflite_quant`); TFLite's fixed-point requantization may land a step away from it on a value within float
    precision of a tie."""

    def hook(name):
        lo, hi, step = grids[name]
        k_lo, k_hi = round(lo / step), round(hi / step)

        def put_on_grid(module, args, output):
            return torch.clamp(torch.round(output / step), k_lo, k_hi) * step
        return put_on_grid

    handles = [layers[name].register_forward_hook(hook(name)) for name in grids if name in layers]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
