"""GPTQ must beat round-to-nearest on the layer-output error it minimises."""

import pytest
import torch

from edgeq.quantize.methods import METHODS, LayerStats
from edgeq.quantize.observers import HessianAccumulator
from edgeq.quantize.primitives import dequantize
from edgeq.recipe import QuantRecipe


def _layer_problem(seed=0, rows=64, cols=128, n=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ mix + 0.1 * torch.randn(n, cols, generator=g)
    x[:, :4] *= 8  # a few outlier channels, as LLM activations have
    w = torch.randn(rows, cols, generator=g) * 0.05
    acc = HessianAccumulator(cols)
    for chunk in x.split(512):
        acc.add(chunk)
    return w, x, acc.result()


def _recipe(bits, group, act_order):
    weight = {"bits": bits, "granularity": "group", "group_size": group} if group else {"bits": bits, "granularity": "channel"}
    return QuantRecipe.from_dict({"rules": [{"match": ".*", "method": "gptq", "weight": weight}],
                                  "gptq": {"act_order": act_order}})


@pytest.mark.parametrize("bits,group,act_order", [(3, None, False), (4, 32, False), (4, 32, True), (2, 64, True)])
def test_gptq_beats_rtn_on_output_error(bits, group, act_order):
    w, x, H = _layer_problem()
    recipe = _recipe(bits, group, act_order)
    rule = recipe.rules[0]
    errors = {}
    for method in ("rtn", "gptq"):
        fn, _ = METHODS[method]
        q, scale, zp = fn(w, rule, LayerStats(hessian=H), recipe)
        wq = dequantize(q, scale, zp, group)
        errors[method] = ((x @ (w - wq).T) ** 2).mean().item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_integers_stay_on_grid_and_hessian_is_exact():
    w, x, H = _layer_problem(seed=1, rows=8, cols=32, n=256)
    assert torch.allclose(H, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    recipe = _recipe(4, 16, True)
    q, scale, zp = METHODS["gptq"][0](w, recipe.rules[0], LayerStats(hessian=H), recipe)
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, q.round())
    assert scale.shape == (8, 2)
