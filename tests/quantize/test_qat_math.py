"""QAT maths on toy layers: STE, LSQ scale gradients, LR-QAT storage and start point, PB-LLM grid and bits, gamma search."""

import math

import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.quantize.lrqat import LRQATLinear, decode_base, encode_base, q44_decode, q44_encode
from edgeq.quantize.methods import METHODS, LayerStats
from edgeq.quantize.pbllm import pb_accounting, pb_grid, pb_gptq, pb_quantize, salient_mask
from edgeq.quantize.primitives import dequantize, dynamic_fake_quant_act, fake_quant, quantize, round_ste
from edgeq.quantize.qat import LSQLinear
from edgeq.recipe import QuantRecipe, Rule


def _rule(weight, activation=None, method="rtn", gamma=1.0):
    return Rule.from_dict({"match": ".*", "weight": weight, "activation": activation or {}, "method": method, "gamma": gamma}, "t")


def _linear(out=8, inp=32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(inp, out, bias=False)


def test_round_ste_is_exact_round_with_identity_gradient():
    x = (torch.randn(1000) * 20).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quant_weight_gradient_is_one_inside_zero_where_clipped():
    w = torch.tensor([[-3.0, -0.4, 0.2, 0.9, 5.0]], requires_grad=True)
    scale = torch.tensor([[0.25]])
    zp = torch.zeros(1, 1, dtype=torch.int16)
    out = fake_quant(w, scale, zp, 4, True)  # grid [-8, 7] * 0.25 = [-2, 1.75]
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    assert torch.equal(out.detach(), dequantize(quantize(w.detach(), scale, zp, 4, True), scale, zp))


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_scale_gradient_matches_the_analytic_formula(symmetric):
    lin = _linear(4, 64)
    layer = LSQLinear("toy", lin, _rule({"bits": 4, "symmetric": symmetric, "granularity": "group", "group_size": 16}))
    with torch.no_grad():
        layer.scale.mul_(0.6)  # force some clipping so both branches of the gradient are exercised
    layer.weight_hat().sum().backward()
    w, s = lin.weight.detach(), layer.scale.detach()
    z = layer.zero_point.float()
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    se = s.repeat_interleave(16, dim=1)
    ze = z.repeat_interleave(16, dim=1)
    v = w / se + ze
    inside = (torch.round(v) >= qmin) & (torch.round(v) <= qmax)
    # d/ds [(clip(round(w/s) + z) - z) * s]: round(w/s) - w/s inside; the clipped level (minus z) outside
    grad = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), qmin, qmax) - ze)
    analytic = grad.reshape(4, 4, 16).sum(-1)
    assert (~inside).any()
    assert torch.allclose(layer.scale.grad, analytic, atol=1e-4)


def test_lsq_starts_on_the_rtn_grid_and_converts_exactly():
    lin = _linear(16, 64)
    rule = _rule({"bits": 3, "symmetric": True, "granularity": "channel", "scale_dtype": "bf16"})
    layer = LSQLinear("toy", lin, rule)
    q_rtn, s_rtn, zp_rtn = METHODS["rtn"][0](lin.weight.detach(), rule, LayerStats(), None)
    q, s, zp = layer.integers()
    assert torch.equal(q, q_rtn) and torch.equal(s, s_rtn)
    ql = layer.to_quant_linear()
    assert torch.equal(ql.weight_2d(), layer.weight_hat().detach())


def test_w16_means_float_weights_on_the_identity_grid():
    rule = _rule({"bits": 16}, {"mode": "dynamic", "bits": 4, "granularity": "group", "group_size": 16})
    w = torch.randn(8, 32)
    q, s, zp = METHODS["rtn"][0](w, rule, LayerStats(), None)
    assert torch.equal(dequantize(q, s, zp), w)
    assert rule.weight.name == "w16-float" and not rule.weight.quantized
    with pytest.raises(EdgeqError):
        _rule({"bits": 12})


def test_groupwise_dynamic_activation_error_is_bounded_per_group():
    x = torch.randn(3, 5, 40)
    x[..., 3] *= 50  # one outlier channel only spoils the first group
    y = dynamic_fake_quant_act(x, 4, group_size=16)
    assert y.shape == x.shape
    err = (y - x).abs()
    assert err[..., 16:].max() < err[..., :16].max()
    for g in range(3):
        xs = x[..., g * 16 : (g + 1) * 16]
        step = (xs.amax(-1).clamp(min=0) - xs.amin(-1).clamp(max=0)) / 15
        assert (err[..., g * 16 : (g + 1) * 16].amax(-1) <= step / 2 + 1e-5).all()


def test_q44_storage_round_trips():
    q = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(q44_encode(q44_decode(q)), q)
    x = torch.linspace(-7.5, 7.5, 1001)
    assert (q44_decode(q44_encode(x)) - x).abs().max() <= 1 / 32 + 1e-6
    assert torch.equal(decode_base(encode_base(x, "q4.4", 4, True), "q4.4"), torch.round(x * 16) / 16)
    with pytest.raises(EdgeqError):
        encode_base(x, "q4.4", 8, True)


@pytest.mark.parametrize("base", ["fp32", "bf16", "q4.4", "int"])
def test_lrqat_starts_at_rtn_and_trains_only_a_b_s(base):
    lin = _linear(16, 64)
    rule = _rule({"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32})
    layer = LRQATLinear("toy", lin, rule, options={"rank": 4, "base_dtype": base})
    q_rtn, _, _ = METHODS["rtn"][0](lin.weight.detach(), rule, LayerStats(), None)
    q, _, _ = layer.integers()
    assert torch.equal(q, torch.clamp(torch.round(decode_base(layer.phi0, base)), -8, 7))
    agree = (q == q_rtn).float().mean()
    assert agree == 1.0 if base in ("fp32", "int") else agree > 0.85  # bf16 / Q4.4 Phi0 moves values near a rounding tie
    assert sorted(n for n, p in layer.named_parameters()) == ["A", "B", "scale"]
    assert not hasattr(layer, "weight")  # the float W0 is not kept
    x = torch.randn(3, 64)
    layer.train()
    layer(x).pow(2).sum().backward()  # through the gradient checkpoint
    assert layer.B.grad.abs().sum() == 0 and layer.A.grad.abs().sum() > 0  # A = 0 at the start: only A moves first
    assert layer.scale.grad.abs().sum() > 0


def test_lrqat_merge_is_bit_exact_after_updates():
    lin = _linear(16, 64)
    layer = LRQATLinear("toy", lin, _rule({"bits": 3, "symmetric": False, "granularity": "channel"}), options={"rank": 8})
    with torch.no_grad():
        layer.A.normal_(0, 0.3)
        layer.scale.mul_(1.1)
    x = torch.randn(5, 64)
    layer.eval()
    ql = layer.to_quant_linear()
    assert ql.qweight.dtype == torch.uint8
    assert torch.equal(layer(x), ql(x))


def test_pbllm_grid_holds_alpha_exactly_and_salient_at_8_bits():
    w = torch.randn(32, 128)
    mask = salient_mask(w, 0.1, "magnitude")
    assert int(mask.sum()) == round(0.1 * w.numel())
    scale, k, rounded = pb_grid(w, mask)
    q = pb_quantize(w, mask, scale, k)
    wq = q * scale
    alpha = (w.abs() * ~mask).sum(1, keepdim=True) / (~mask).sum(1, keepdim=True)
    assert rounded == 0
    assert torch.allclose(wq.abs()[~mask], alpha.expand_as(w)[~mask], rtol=1e-6)
    assert ((wq - w).abs()[mask] <= (scale.expand_as(w)[mask] / 2 + 1e-7)).all()
    assert q.abs().max() <= 127


def test_pb_gptq_beats_plain_partial_binarization_on_output_error():
    torch.manual_seed(0)
    x = torch.randn(2048, 64) @ torch.randn(64, 64) * 0.3  # correlated inputs
    w = torch.randn(32, 64)
    H = 2 * x.T @ x / len(x)
    mask = salient_mask(w, 0.2, "hessian", H)
    scale, k, _ = pb_grid(w, mask)
    err = lambda q: float(((x @ (w - q * scale).T) ** 2).mean())
    assert err(pb_gptq(w, H, mask, scale, k)) < err(pb_quantize(w, mask, scale, k))


@pytest.mark.parametrize("init", ["gptq", "float"])
def test_pbllm_qat_starts_at_pb_gptq_or_at_the_binarized_floats(init):
    """QAT's start is PB-GPTQ's integers bit for bit (its latent weights are the columns GPTQ binarized, so the
    signs are GPTQ's), or with qat_init = "float" the float weights binarized as they are; salient integers frozen."""
    from edgeq.quantize.pbllm import PBLLMQATLinear

    torch.manual_seed(0)
    x = torch.randn(1024, 64) @ torch.randn(64, 64) * 0.3
    lin = _linear(16, 64)
    H = 2 * x.T @ x / len(x)
    w = lin.weight.detach()
    layer = PBLLMQATLinear("t", lin, _rule({"bits": 8, "symmetric": True, "granularity": "channel"}, method="pb-llm"),
                           options={"salient_fraction": 0.2, "criterion": "hessian", "hessian": H, "qat_init": init})
    mask = salient_mask(w, 0.2, "hessian", H)
    scale, k, _ = pb_grid(w, mask)
    want = pb_gptq(w, H, mask, scale, k) if init == "gptq" else pb_quantize(w, mask, scale, k)
    q, got_scale, _ = layer.integers()
    assert torch.equal(q, want) and torch.equal(got_scale, scale)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["weight"]  # salient integers are buffers


def test_pbllm_bit_accounting_includes_the_mask():
    acc = pb_accounting(128, 384, 0.1)
    n = 128 * 384
    n_sal = round(0.1 * n)
    assert acc["salient_weights"] == n_sal
    assert acc["bits_per_weight"] == round(((n - n_sal) + 8 * n_sal + n + 128 * 40) / n, 4)
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert acc["bits_per_weight_entropy_mask"] == round(((n - n_sal) + 8 * n_sal + n * h + 128 * 40) / n, 4)
    assert acc["bits_per_weight_no_mask"] < acc["bits_per_weight_entropy_mask"] < acc["bits_per_weight"]


def test_gamma_search_never_loses_to_gamma_one():
    torch.manual_seed(1)
    x = torch.randn(1024, 64)
    x[:, :4] *= 8
    w = torch.randn(16, 64)
    w[0, 0] = 12.0  # an outlier weight makes clipping worthwhile
    H = 2 * x.T @ x / len(x)
    recipe = QuantRecipe.from_dict({"rules": [{"match": ".*"}]})
    rule = _rule({"bits": 3, "symmetric": True, "granularity": "channel"}, method="rtn-gamma")
    stats = LayerStats(hessian=H)
    err = lambda q, s, z: float(((x @ (w - dequantize(q, s, z)).T) ** 2).sum())
    searched = err(*METHODS["rtn-gamma"][0](w, rule, stats, recipe))
    plain = err(*METHODS["rtn"][0](w, rule, stats, recipe))
    assert searched < plain


@pytest.mark.parametrize("weight,act", [
    ({"bits": 16}, {"mode": "dynamic", "bits": 4, "granularity": "group", "group_size": 16}),
    ({"bits": 8, "symmetric": True, "granularity": "channel"}, {"mode": "static", "bits": 8}),
    ({"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32, "scale_dtype": "bf16"}, {"mode": "dynamic", "bits": 8, "granularity": "token"}),
])
def test_lsq_layer_converts_to_the_same_forward(weight, act):
    from edgeq.quantize.primitives import act_qparams

    lin = _linear(8, 64)
    x = torch.randn(2, 5, 64)
    rule = _rule(weight, act)
    aq = act_qparams(x.min(), x.max()) if act["mode"] == "static" else None
    layer = LSQLinear("toy", lin, rule, aq)
    with torch.no_grad():
        if rule.weight.quantized:
            layer.scale.mul_(0.93)  # as if trained
        layer.weight.add_(0.01 * torch.randn_like(layer.weight))
    ql = layer.to_quant_linear()
    assert torch.equal(layer(x), ql(x))
