"""Round trips with error bounds for the pure quantization primitives."""

import pytest
import torch

from edgeq.quantize import primitives as P


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("channel", None), ("group", 32)])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, granularity, group):
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    scale, zp = P.compute_qparams(w, bits, symmetric, granularity, group)
    gs = group if granularity == "group" else None
    if granularity == "tensor":
        scale, zp = scale.expand(16, 1), zp.expand(16, 1)
    q = P.quantize(w, scale, zp, bits, symmetric, gs)
    qmin, qmax = P.qrange(bits, symmetric)
    assert q.min() >= qmin and q.max() <= qmax
    assert torch.equal(q, q.round())
    err = (P.dequantize(q, scale, zp, gs) - w).abs()
    step = P.expand_groups(scale, w.shape[1], gs)
    assert torch.all(err <= step / 2 + 1e-6)


def test_symmetric_int8_never_uses_minus_128_and_int4_uses_absmax_over_7():
    w = torch.tensor([[-1.0, 0.5, 1.0, -0.25]])
    scale, zp = P.compute_qparams(w, 8, True, "channel")
    q = P.quantize(w, scale, zp, 8, True)
    assert q.min() == -127 and torch.all(zp == 0)
    scale4, _ = P.compute_qparams(w, 4, True, "channel")
    assert torch.allclose(scale4, torch.tensor([[1.0 / 7]]))


def test_all_zero_row_scale_is_litert_quantizers():
    """ai-edge-quantizer raises a symmetric absmax to 1e-9 before dividing; edgeq's grid does the same, so a zero row
    (an embedding's padding row in a head copied from it) carries its scale into a TFLite file bitwise."""
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    scale, _ = P.compute_qparams(w, 8, True, "channel")
    one_e_minus_9 = torch.tensor(1e-9, dtype=torch.float32)
    assert scale[0, 0].item() == (one_e_minus_9 / 127).item() and scale[1, 0].item() == (torch.tensor(2.0) / 127).item()
    assert torch.all(P.quantize(w, scale, torch.zeros_like(scale), 8, True)[0] == 0)


def test_short_last_group_and_bf16_scales():
    torch.manual_seed(1)
    w = torch.randn(4, 72)  # 72 = 2 groups of 32 + 8
    scale, zp = P.compute_qparams(w, 4, True, "group", 32, scale_dtype="bf16")
    assert scale.shape == (4, 3)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())
    q = P.quantize(w, scale, zp, 4, True, 32)
    assert (P.dequantize(q, scale, zp, 32) - w).abs().max() <= scale.max()  # bf16 rounding may clip by < 1 step


def test_gamma_shrinks_the_range():
    w = torch.randn(8, 64)
    s1, _ = P.compute_qparams(w, 4, True, "channel", gamma=1.0)
    s2, _ = P.compute_qparams(w, 4, True, "channel", gamma=0.8)
    assert torch.allclose(s2, 0.8 * s1)


def test_asymmetric_zero_point_makes_zero_exact():
    w = torch.rand(8, 64) + 0.1  # all positive: range widened to include 0
    scale, zp = P.compute_qparams(w, 4, False, "channel")
    z = torch.zeros(8, 1)
    q0 = P.quantize(z, scale, zp, 4, False)
    assert torch.all(P.dequantize(q0, scale, zp) == 0)


def test_fake_quant_straight_through_gradients():
    w = torch.randn(4, 16, requires_grad=True)
    scale, zp = P.compute_qparams(w, 4, True, "channel")
    scale = scale.clone().requires_grad_(True)
    out = P.fake_quant(w, scale, zp, 4, True)
    out.sum().backward()
    inside = (w / scale).abs() <= 7
    assert torch.all(w.grad[inside] == 1.0)  # STE: identity inside the clip range
    # LSQ: d out / d s = round(w/s) - w/s inside the range
    expected = (torch.round(w / scale) - w / scale).detach().sum(dim=1, keepdim=True)
    assert torch.allclose(scale.grad, expected, atol=1e-5)


def test_dynamic_activation_grid_matches_onnxruntime_formula():
    x = torch.tensor([[-1.0, 0.2, 3.0]])
    scale, zp = P.act_qparams(x.min(), x.max())
    assert torch.isclose(scale, torch.tensor(4.0 / 255))
    assert zp.item() == round(1.0 / (4.0 / 255))
    y = P.dynamic_fake_quant_act(x)
    assert (y - x).abs().max() <= scale / 2 + 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_round_trip(signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    q = torch.randint(lo, hi + 1, (5, 33), dtype=torch.int16).to(torch.int8 if signed else torch.uint8)
    packed = P.pack_int4(q)
    assert packed.shape == (5, 17)
    assert torch.equal(P.unpack_int4(packed, 33, signed), q)


def test_binary_weights_use_mean_abs():
    w = torch.tensor([[0.5, -1.5, 1.0, -1.0]])
    scale, zp = P.compute_qparams(w, 1, True, "channel")
    assert torch.allclose(scale, torch.tensor([[1.0]]))
    assert torch.equal(P.quantize(w, scale, zp, 1, True), torch.tensor([[1.0, -1.0, 1.0, -1.0]]))


def test_full_range_grid_uses_all_levels_and_maps_the_extreme_exactly():
    """range = 'full': the largest-magnitude value of each group lands on -2^(b-1) (signed scale)."""
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[0, 5] = 9.0  # a positive extreme: its group's scale turns negative
    scale, zp = P.compute_qparams(w, 4, True, "group", 64, full_range=True)
    q = P.quantize(w, scale, zp, 4, True, 64)
    assert scale[0, 0] < 0 and q[0, 5] == -8 and (zp == 0).all()
    assert q.min() == -8 and q.max() <= 7 and len(torch.unique(q)) == 16
    back = P.dequantize(q, scale, zp, 64)
    assert back[0, 5] == pytest.approx(9.0, rel=1e-6)
    narrow_scale, _ = P.compute_qparams(w, 4, True, "group", 64)
    assert torch.allclose(scale.abs() * 8, narrow_scale * 7)  # step absmax/8 instead of absmax/7
    err_full = (back - w).abs().mean()
    err_narrow = (P.dequantize(P.quantize(w, narrow_scale, zp, 4, True, 64), narrow_scale, zp, 64) - w).abs().mean()
    assert err_full < err_narrow


@pytest.mark.parametrize("n", [1, 2, 10, 1000, 65537, 1 << 21])
def test_tail_quantiles_are_torch_quantile(n):
    """The percentile observer's quantiles (topk of the tails) equal torch.quantile value for value,
    in the tails and in the middle (where it falls back to torch.quantile)."""
    from edgeq.quantize.observers import tail_quantiles

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3 + torch.randn(n, generator=g).pow(5)  # heavy tails
    for qs in ([1e-5, 1 - 1e-5], [1e-4, 0.9999], [0.001, 0.999], [0.3, 0.7], [0.0, 1.0]):
        assert torch.equal(tail_quantiles(x, qs), torch.quantile(x, torch.tensor(qs))), (n, qs)


def test_static_symmetric_grid_saturates_at_the_container():
    """Static grids saturate where QuantizeLinear / LiteRT's Quantize do (the int16 container's -32768); the dynamic
    grids edgeq renders itself stop at -32767."""
    scale, zp = torch.tensor(1.0), torch.tensor(0)
    x = torch.tensor([-40000.0, -32767.6, 5.5, 40000.0])
    assert P.fake_quant_act(x, scale, zp, 16, symmetric=True, narrow=False).tolist() == [-32768.0, -32768.0, 6.0, 32767.0]
    assert P.fake_quant_act(x, scale, zp, 16, symmetric=True).tolist() == [-32767.0, -32767.0, 6.0, 32767.0]


def test_bf16_scales_are_exact_in_litert_s_fp16_storage():
    """LiteRT stores INT4 block scales as fp16 holding bf16 values: a bf16 scale under fp16's least normal (2^-14) lost
    bits there, and the TFLite export refused the plan (ConvNeXt's pwconv2 under an untrained 1e-6 layer scale). Such a
    scale is raised to 2^-14; every scale then reads back bitwise from fp16, and weights that small quantize on it."""
    from edgeq.quantize.primitives import FP16_NORMAL, compute_qparams, round_scale

    scale = torch.tensor([1e-9, 3e-7, 2**-14, 1e-3, 0.37, 9e4, -1e-8])
    got = round_scale(scale, "bf16")
    assert got[0] == got[1] == 2**-14 and got[2] == 2**-14 and got[-1] == -(2**-14) and got[5] == FP16_NORMAL[1]
    assert torch.equal(got.to(torch.float16).to(torch.float32), got)
    assert torch.equal(got.to(torch.bfloat16).to(torch.float32), got)
    w = torch.randn(4, 64) * 1e-6
    s, _ = compute_qparams(w, 4, True, "group", 32, scale_dtype="bf16")
    assert torch.equal(s.to(torch.float16).to(torch.float32), s) and (s == 2**-14).all()
