"""Pure quantize / dequantize / pack primitives with straight-through gradients.

Grid conventions (shared by the simulation, the ONNX and the TFLite renderings):
- symmetric b-bit: signed integers, zero point 0, scale = gamma * absmax / (2^(b-1) - 1),
  q clipped to [-(2^(b-1)), 2^(b-1) - 1]; the most negative value is never produced by
  rounding, which is LiteRT's narrow int8 range and its int4 convention [-8, 7] with absmax / 7.
- asymmetric b-bit: unsigned integers in [0, 2^b - 1] with an unsigned zero point.
- 1-bit: binary {-1, +1} with scale alpha = mean |w| (PB-LLM's optimal binarization scale).
- 16-bit (`FLOAT_BITS`): the weight stays float (W16A4 and friends): "integers" are the float
  values themselves with scale 1 and zero point 0, so `(q - zp) * scale` is the identity.
Dequantization is always `(q - zp) * scale`. Groups run along the last (input) dimension;
a last group shorter than the group size is allowed.

Nothing here keeps state; QAT reuses these functions with learnable scales.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


FLOAT_BITS = 16
# A symmetric group's absmax is raised to at least this before dividing by the largest integer: LiteRT's
# quantizer does the same (ai-edge-quantizer's `min_bound`), so an all-zero row's scale is also the file's.
MIN_ABSMAX = 1e-9


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of a b-bit grid."""
    if bits == 1:
        return -1, 1
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def storage_dtype(bits: int, symmetric: bool) -> torch.dtype:
    if bits >= FLOAT_BITS:
        return torch.float32
    return torch.int8 if symmetric or bits == 1 else torch.uint8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even with a straight-through (identity) gradient.

    Written as `round(x) + (x - x.detach())` so the forward value is exactly `round(x)` (the added
    term is an exact zero): QAT layers then merge bit-exactly into integers."""
    return torch.round(x).detach() + (x - x.detach())


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]; a short last group is padded by repeating its last value."""
    if group_size is None:
        return w.unsqueeze(1)
    pad = (-w.shape[1]) % group_size
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return w.reshape(w.shape[0], -1, group_size)


def expand_groups(p: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Per-group parameters [out, n_groups] -> per-element [out, in]."""
    if group_size is None:
        return p.expand(p.shape[0], in_features) if p.shape[1] == 1 else p
    return p.repeat_interleave(group_size, dim=1)[:, :in_features]


# the magnitudes fp16 holds with bf16's precision: its least normal, and the largest bf16 value <= 65504
FP16_NORMAL = (2.0**-14, 65280.0)


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Make scales exactly representable where a runtime stores them narrower than fp32. `bf16` is LiteRT's INT4 block
    scale: fp16 storage holding bf16 values, so bf16 precision within fp16's normal range. A smaller magnitude would
    lose bits as an fp16 subnormal (a group of weights near zero: ConvNeXt's pwconv2 under an untrained 1e-6 layer
    scale); its scale is raised to 2^-14, which only coarsens a grid whose values are that small."""
    if scale_dtype == "bf16":
        magnitude = scale.abs().clamp(*FP16_NORMAL)
        return torch.where(scale < 0, -magnitude, magnitude).to(torch.bfloat16).to(torch.float32)
    return scale.to(torch.float32)


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None = None,
    gamma: float = 1.0,
    scale_dtype: str = "fp32",
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for a 2-D weight [out, in]: both shaped [out or 1, n_groups].

    Symmetric grids scale absmax to the largest positive integer (2^(b-1) - 1: LiteRT's convention)
    unless `full_range`: then the group's largest-magnitude value maps exactly to the most negative
    integer -2^(b-1) (the scale takes that value's sign, ONNX Runtime MatMulNBits' convention), so
    all 2^b levels are used.
    """
    w = w.detach().to(torch.float32)
    if granularity == "tensor":
        g = w.reshape(1, 1, -1)
    else:
        g = group_view(w, group_size if granularity == "group" else None)
    qmin, qmax = qrange(bits, symmetric)
    eps = torch.finfo(torch.float32).tiny * 2**40
    if bits >= FLOAT_BITS:
        scale = torch.ones(g.shape[:2])
        zp = torch.zeros_like(scale, dtype=torch.int16)
    elif bits == 1:
        scale = g.abs().mean(dim=-1).clamp_min(eps)
        zp = torch.zeros_like(scale, dtype=torch.int16)
    elif symmetric and full_range:
        idx = g.abs().argmax(dim=-1, keepdim=True)
        extreme = torch.gather(g, -1, idx).squeeze(-1) * gamma
        scale = torch.where(extreme.abs() < eps, torch.full_like(extreme, -eps), extreme) / qmin
        zp = torch.zeros_like(scale, dtype=torch.int16)
    elif symmetric:
        absmax = g.abs().amax(dim=-1) * gamma
        scale = absmax.clamp_min(MIN_ABSMAX) / qmax
        zp = torch.zeros_like(scale, dtype=torch.int16)
    else:
        lo = g.amin(dim=-1).clamp(max=0) * gamma
        hi = g.amax(dim=-1).clamp(min=0) * gamma
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        scale = round_scale(scale, scale_dtype)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int16)
    return round_scale(scale, scale_dtype), zp


def quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool,
             group_size: int | None = None) -> torch.Tensor:
    """Integers of `w` on the grid (returned as float holding integer values; no gradient)."""
    qmin, qmax = qrange(bits, symmetric)
    s = expand_groups(scale, w.shape[1], group_size)
    z = expand_groups(zp.to(w.dtype), w.shape[1], group_size)
    if bits >= FLOAT_BITS:
        return w.clone()
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    return torch.clamp(torch.round(w / s) + z, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """`(q - zp) * scale`, broadcast over groups along the input dimension."""
    s = expand_groups(scale.to(torch.float32), q.shape[1], group_size)
    z = expand_groups(zp.to(torch.float32), q.shape[1], group_size)
    return (q.to(torch.float32) - z) * s


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool,
               group_size: int | None = None) -> torch.Tensor:
    """Quantize-dequantize with STE for `w` and LSQ-style gradients for `scale`."""
    if bits >= FLOAT_BITS:
        return w
    qmin, qmax = qrange(bits, symmetric)
    s = expand_groups(scale, w.shape[1], group_size)
    z = expand_groups(zp.to(w.dtype), w.shape[1], group_size)
    if bits == 1:
        sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        return (sign + (w - w.detach())) * s
    q = torch.clamp(round_ste(w / s) + z, qmin, qmax)
    return (q - z) * s


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation grid from a range, as ONNX Runtime's DynamicQuantizeLinear computes it.

    Asymmetric: the range is widened to include 0, scale = (hi - lo) / (2^b - 1) and the zero
    point is rounded (half to even) and saturated to [0, 2^b - 1], so 0.0 is exact.
    """
    lo = torch.clamp(lo, max=0.0).to(torch.float32)
    hi = torch.clamp(hi, min=0.0).to(torch.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(hi, -lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zp


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int = 8, symmetric: bool = False,
                   narrow: bool = True) -> torch.Tensor:
    """Quantize-dequantize activations on a given grid (STE through the rounding).

    Symmetric grids saturate at +-(2^(b-1) - 1) (`narrow`, the dynamic grids edgeq renders itself) or at
    the signed container's [-2^(b-1), 2^(b-1) - 1] (`narrow=False`: static grids, where ONNX's
    QuantizeLinear and LiteRT's Quantize op do the saturating).
    """
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    z = zp.to(x.dtype)
    q = torch.clamp(round_ste(x / scale) + z, qmin, qmax)
    return (q - z) * scale


def dynamic_fake_quant_act(x: torch.Tensor, bits: int = 8, per_token: bool = False, symmetric: bool = False,
                           group_size: int | None = None) -> torch.Tensor:
    """Dynamic activation quantization: the grid is computed from `x` itself (per tensor, per token,
    or per group of `group_size` consecutive channels of each token)."""
    if group_size is not None:
        n = x.shape[-1]
        pad = (-n) % group_size
        xg = F.pad(x, (0, pad)) if pad else x
        xg = xg.reshape(*x.shape[:-1], -1, group_size)
        lo = xg.detach().amin(dim=-1, keepdim=True)
        hi = xg.detach().amax(dim=-1, keepdim=True)
        scale, zp = act_qparams(lo, hi, bits, symmetric)
        out = fake_quant_act(xg, scale, zp, bits, symmetric).reshape(*x.shape[:-1], -1)
        return out[..., :n] if pad else out
    if per_token:
        lo = x.detach().amin(dim=-1, keepdim=True)
        hi = x.detach().amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.detach().amin(), x.detach().amax()
    scale, zp = act_qparams(lo, hi, bits, symmetric)
    return fake_quant_act(x, scale, zp, bits, symmetric)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (int8/uint8 holding [-8, 15]) two per byte, low nibble first, along the last dim."""
    q = q.to(torch.int16) & 0xF
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_int4` for the first `n` values of the last dim."""
    p = packed.to(torch.int16)
    q = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    if signed:
        q = torch.where(q >= 8, q - 16, q)
    return q.to(torch.int8 if signed else torch.uint8)
