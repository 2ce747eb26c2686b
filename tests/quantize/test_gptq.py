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


def test_value_projection_hessian_mixes_inputs_by_attention(tiny_llama_ref):
    """v_proj's Hessian is built from sum_j a_hij x_j, what the attention output is made of."""
    from edgeq.models import load_model
    from edgeq.models.hf import eager_attention as _eager_attention
    from edgeq.quantize.calibration import _observing, no_cache
    from edgeq.quantize.ptq import plan

    model = load_model(tiny_llama_ref).module.eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    recipe = _recipe(4, 32, True)
    name = "model.layers.1.self_attn.v_proj"
    targets = {n: t for n, t in plan(model, recipe).items() if n == name}
    seen = {}
    hook = model.get_submodule(name).register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad(), _eager_attention(model, True):
        weights = model(ids, output_attentions=True, use_cache=False).attentions[1]
        with _observing(model, [name], targets, recipe) as stats:
            model(ids, **no_cache(model))
    hook.remove()
    mixed = (weights @ seen["x"].unsqueeze(1)).reshape(-1, seen["x"].shape[-1]).double()
    st, acc, _ = stats[name]
    assert st.hessian_kind == "attention"
    assert torch.allclose(acc.result().double(), 2 * mixed.T @ mixed / mixed.shape[0], rtol=1e-4, atol=1e-6)
    assert model.config._attn_implementation != "eager"  # restored after calibration


@pytest.mark.parametrize("value_hessian", ["attention", "input"])
def test_quant_json_records_the_value_hessian(value_hessian, tiny_llama_ref):
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model

    bundle = load_model(tiny_llama_ref)
    recipe = QuantRecipe.from_dict({"rules": [{"match": "layers", "method": "gptq", "weight": {"bits": 4, "granularity": "group", "group_size": 32}}],
                                    "gptq": {"value_hessian": value_hessian}})
    qm = quantize_model(bundle, recipe, calibration_batches(bundle, "enwiki", 4, 64))
    layers = bundle.module.config.num_hidden_layers
    assert qm.extra.get("gptq_value_hessians") == ({"attention": layers} if value_hessian == "attention" else None)


def test_unknown_value_hessian_is_refused():
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="value_hessian"):
        QuantRecipe.from_dict({"rules": [{"match": ".*"}], "gptq": {"value_hessian": "output"}})


def test_layers_reading_one_input_share_one_hessian(tiny_llama_ref):
    """q/k read the same tensor (one Hessian, accumulated once); o_proj reads another."""
    from edgeq.models import load_model
    from edgeq.quantize.calibration import _observing
    from edgeq.quantize.ptq import plan

    model = load_model(tiny_llama_ref).module.eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    recipe = _recipe(4, 32, True)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qko"]
    targets = {n: t for n, t in plan(model, recipe).items() if n in names}
    seen = {}
    hook = model.get_submodule(names[0]).register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad(), _observing(model, names, targets, recipe) as stats:
        model(ids, use_cache=False)
        model(ids, use_cache=False)
    hook.remove()
    (_, q_acc, _), (_, k_acc, _), (_, o_acc, _) = (stats[n] for n in names)
    assert q_acc is k_acc and o_acc is not q_acc
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    assert q_acc.n == 2 * x.shape[0]  # each call's rows once, not once per layer
    assert torch.allclose(q_acc.result().double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_keeps_8_bit_narrow_grids_inside_litert_int8(bits):
    """Error feedback pushes columns past the absmax their scale came from. On 8-bit narrow grids GPTQ stops at -127
    (LiteRT's int8 weights are [-127, 127]); 4-bit grids keep -8, which LiteRT's int4 weights hold."""
    w, _, H = _layer_problem(seed=3)
    w[:, 0] *= 20  # one dominant column: its error moves the others far
    recipe = _recipe(bits, None, False)
    fn, _ = METHODS["gptq"]
    q, _, _ = fn(w, recipe.rules[0], LayerStats(hessian=H), recipe)
    assert int(q.max()) == 2 ** (bits - 1) - 1
    assert int(q.min()) == (-127 if bits == 8 else -8)
