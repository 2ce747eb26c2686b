"""Read an exported ONNX file's integers, scales and zero points back and compare them with edgeq's, bitwise."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .onnx_edit import LayerQ, Rendered


def read_back(model: onnx.ModelProto, rendered: list[Rendered], layers: list[LayerQ]) -> list[dict]:
    """Compare the integers, scales and zero points stored in `model` with the layers' own, bitwise."""
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {lq.name: lq for lq in layers}
    results = []
    for r in rendered:
        lq = by_name[r.layer]
        out = {"layer": r.layer, "op": r.op, "container": r.container, "layout": r.layout, "blocked": r.blocked,
               "activation": r.activation, "offset": r.offset, "zero_point_rows": r.zero_point_rows,
               "bias_int32_error": r.bias_error, "rescaled_channels": r.rescaled_channels,
               "tensors": {"weight": r.weight, "scale": r.scale, "zero_point": r.zero_point}}
        try:
            q = numpy_helper.to_array(inits[r.weight]).astype(np.int16)
            scale = numpy_helper.to_array(inits[r.scale]).astype(np.float32)
            if r.zero_point:
                zp = numpy_helper.to_array(inits[r.zero_point]).astype(np.int16) - r.offset
            else:  # packed 4-bit bytes, low nibble first, around the ops' default zero point
                q = np.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[0], -1)
                zp = np.zeros(scale.shape, dtype=np.int16)
            q = q - r.offset
        except KeyError as exc:
            out.update(ints=False, scales=False, zero_points=False, error=f"missing initializer {exc}")
            results.append(out)
            continue
        if r.zero_point_rows:
            # the rows after the layer's own hold minus its column sums in pieces (onnx_dynamic.zero_point_rows)
            own, extra = q[:-r.zero_point_rows], q[-r.zero_point_rows:]
            out["zero_point_sums"] = bool(np.array_equal(extra.astype(np.int64).sum(axis=0), -own.astype(np.int64).sum(axis=0)))
            q = own
        if r.layout == "io":
            q = q.T
            scale, zp = (scale.T, zp.T) if r.blocked else (scale[:, None], zp[:, None])
        elif not r.blocked:
            scale, zp = scale[:, None], zp[:, None]
        q = q.reshape(q.shape[0], -1)
        ref_q, ref_scale, ref_zp = lq.q.astype(np.int16), lq.scale.astype(np.float32), lq.zero_point.astype(np.int16)
        out["ints"] = q.shape == ref_q.shape and bool(np.array_equal(q, ref_q))
        out["scales"] = scale.shape == ref_scale.shape and bool(np.array_equal(scale.view(np.uint32), ref_scale.view(np.uint32)))
        out["zero_points"] = zp.shape == ref_zp.shape and bool(np.array_equal(zp, ref_zp))
        if lq.act_mode == "static":
            # the input QuantizeLinear nodes (one may be shared with the other layers reading the same tensor)
            node_inputs = {n.name: list(n.input) for n in model.graph.node if n.op_type == "QuantizeLinear"}
            qnodes = [node_inputs[n] for n in r.nodes if n in node_inputs]
            ok = bool(qnodes) and all(
                inp is not None
                and numpy_helper.to_array(inits[inp[1]]).astype(np.float32).view(np.uint32) == lq.act_scale.astype(np.float32).view(np.uint32)
                and int(numpy_helper.to_array(inits[inp[2]])) == int(lq.act_zero_point) for inp in qnodes)
            out["act_qparams"] = bool(ok)
        out["exact"] = not r.rescaled_channels and all(
            out.get(k, True) for k in ("ints", "scales", "zero_points", "act_qparams", "zero_point_sums"))
        results.append(out)
    return results
