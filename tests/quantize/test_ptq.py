"""PTQ on the toy LM and a small CNN: the quantized-model directory round-trips exactly."""

import json

import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.models import load_model
from edgeq.models.inputs import calibration_batches
from edgeq.quantize.modules import QuantLinear, quant_layers
from edgeq.quantize.ptq import quantize_model
from edgeq.quantize.qmodel import load_quantized
from edgeq.quantize.transforms import fold_norms
from edgeq.recipe import QuantRecipe, load_recipe


def _ids():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def test_norm_folding_is_exact(tiny_llama_ref):
    bundle = load_model(tiny_llama_ref)
    ids = _ids()
    with torch.no_grad():
        before = bundle.module(ids).logits
        folded = fold_norms(bundle.module)
        after = bundle.module(ids).logits
    assert len(folded) == 2 * 4 + 1
    assert torch.allclose(before, after, atol=1e-4)
    assert torch.all(bundle.module.model.layers[0].input_layernorm.weight == 1)


@pytest.mark.parametrize("preset", ["w8", "w8a8", "w4-g64", "w4-g128-rtn"])
def test_presets_on_tiny_llama_save_and_reload_bit_exactly(preset, tiny_llama_ref, tmp_path):
    bundle = load_model(tiny_llama_ref)
    recipe = load_recipe(preset)
    batches = calibration_batches(bundle, "enwiki", 4, 64) if recipe.needs_calibration else None
    qm = quantize_model(bundle, recipe, batches)
    layers = quant_layers(qm.model)
    head = preset in ("w8", "w8a8")  # INT8 presets quantize the LM head (as ONNX Runtime does); INT4 ones keep it float
    assert len(layers) == 4 * 7 + head  # every linear of every block
    assert ("lm_head" in layers) == head
    ids = _ids()
    with torch.no_grad():
        out = qm.model(ids).logits
    qm.save(tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        out2 = again.model(ids).logits
    assert torch.equal(out, out2)
    summary = json.loads((tmp_path / "q" / "quant.json").read_text())
    bits = recipe.rules[-1].weight.bits
    assert bits <= summary["avg_bits"] < bits + 1  # scales and zero points cost a little
    assert 0 < summary["size_reduction"] < 1
    assert summary["bytes_after"] < summary["bytes_before"]
    for layer in again.layers().values():
        assert layer.qweight.dtype == torch.int8
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        assert lo <= int(layer.qweight.min()) and int(layer.qweight.max()) <= hi


def test_static_activations_get_a_calibrated_uint8_grid(tiny_llama_ref):
    bundle = load_model(tiny_llama_ref)
    qm = quantize_model(bundle, load_recipe("w8a8"), calibration_batches(bundle, "enwiki", 4, 64))
    layer = qm.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear)
    assert 0 <= int(layer.act_zero_point) <= 255 and float(layer.act_scale) > 0
    down = qm.model.model.layers[0].mlp.down_proj  # the outlier-heavy FC2 input is quantized per token at run time
    assert down.decision.activation.mode == "dynamic" and down.decision.activation.granularity == "token"
    assert qm.summary()["smoothed_layers"] == 4 * 6


def test_quality_of_int8_is_close_to_fp32(tiny_llama_ref):
    from edgeq import data
    from edgeq.evaluate import perplexity

    bundle = load_model(tiny_llama_ref)
    windows = data.lm_windows(bundle.tokenizer, "enwiki", "evaluation", 128, 4)

    def ppl(model):
        return perplexity(lambda ids: model(torch.from_numpy(ids)).logits.detach().numpy(), windows)["ppl"]

    fp32 = ppl(bundle.module)
    calib = load_model(tiny_llama_ref)
    qm = quantize_model(calib, load_recipe("w8"), calibration_batches(calib, "enwiki", 4, 128))  # smoothing needs data
    w2 = QuantRecipe.from_dict({"rules": [{"match": ".*", "weight": {"bits": 2, "granularity": "channel"}}]})
    bad = quantize_model(load_model(tiny_llama_ref), w2)
    assert abs(ppl(qm.model) / fp32 - 1) < 0.02
    assert ppl(bad.model) > 1.2 * fp32  # 2-bit per-channel RTN really hurts: the metric is sensitive


def test_gptq_without_calibration_is_a_clear_error(tiny_llama_ref):
    with pytest.raises(EdgeqError, match="needs calibration data"):
        quantize_model(load_model(tiny_llama_ref), load_recipe("w4-g128"))


def test_factory_cnn_quantizes_convs_and_linear(tmp_path):
    bundle = load_model("factories:small_cnn")
    recipe = QuantRecipe.from_dict({"rules": [{"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "static"}}]})
    batches = [(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = bundle.module(x)
    qm = quantize_model(bundle, recipe, batches)
    assert set(quant_layers(qm.model)) == {"conv1", "conv2", "fc"}
    with torch.no_grad():
        out = qm.model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    qm.save(tmp_path / "cnn")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "cnn").model(x), out)


def test_group_size_on_conv_is_refused():
    bundle = load_model("factories:small_cnn")
    recipe = QuantRecipe.from_dict({"rules": [{"match": "conv", "weight": {"bits": 4, "granularity": "group", "group_size": 16}}]})
    with pytest.raises(EdgeqError, match=r"2 convolution\(s\) \(conv1 first\) match a rule with group-wise weights.*w8 or "
                                         r"w8a8-static.*kind = \"conv2d\""):
        quantize_model(bundle, recipe)


def test_an_llm_int4_preset_on_a_cnn_is_refused_before_calibrating():
    """`edgeq quantize efficientnet-lite0 -r w4-g64-litert` stopped inside GPTQ's calibration with "GPTQ on
    grouped/depthwise convolutions is not supported; use method = 'rtn' for them" (no layer named, and a preset a
    user cannot edit), then, its depthwise convs skipped, on the first conv's group-wise weights. Both are refused
    up front, naming a layer and what to do, with no calibration data needed to find out."""
    bundle = load_model("tests.export.onnx_cnn:batchnorm_cnn")
    with pytest.raises(EdgeqError, match=r"recipe 'w4-g64-litert': 3 convolution\(s\) \(stem first\).*group-wise"):
        quantize_model(bundle, load_recipe("w4-g64-litert"))
    recipe = QuantRecipe.from_dict({"name": "gptq-convs", "rules": [
        {"match": ".*", "kind": ["conv2d"], "method": "gptq", "weight": {"bits": 4}}]})
    with pytest.raises(EdgeqError, match=r"1 grouped/depthwise convolution\(s\) \(dw first\) match a rule with method "
                                         r"'gptq'.*kind = \"depthwise\""):
        quantize_model(load_model("tests.export.onnx_cnn:batchnorm_cnn"), recipe)


def test_smoothing_is_exact_in_float_and_recorded(tiny_llama_ref):
    from edgeq.quantize.transforms import smooth

    bundle = load_model(tiny_llama_ref)
    model = bundle.module
    fold_norms(model)
    ids = _ids()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    gen = torch.Generator().manual_seed(0)
    absmax = {n: torch.rand(model.get_submodule(n).in_features, generator=gen) * 50 + 0.1 for n in names}
    with torch.no_grad():
        before = model(ids).logits
        done = smooth(model, absmax, 0.5, names)
        after = model(ids).logits
    assert len(done) == 4 * 6  # q, k, v, gate, up, down in each of 4 blocks
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-3)
    assert not torch.all(model.model.layers[0].input_layernorm.weight == 1)  # the scale moved into the norm

    recipe = QuantRecipe.from_dict({"smoothing": 0.5, "rules": [
        {"match": "lm_head", "skip": True},
        {"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "static"}}]})
    b2 = load_model(tiny_llama_ref)
    qm = quantize_model(b2, recipe, calibration_batches(b2, "enwiki", 2, 64))
    assert qm.summary()["smoothed_layers"] == 24
    # 16-bit grids hold the outliers: down_proj at a16 (w8a8-static-fc2a16) is not smoothed, the rest is
    b3 = load_model(tiny_llama_ref)
    qm = quantize_model(b3, load_recipe("w8a8-static-fc2a16"), calibration_batches(b3, "enwiki", 2, 64))
    assert qm.summary()["smoothed_layers"] == 4 * 5
    assert {n.rsplit(".", 1)[1] for n, m in qm.layers().items() if m.decision.activation.bits == 16} == {"down_proj"}


def test_a_norm_feeding_more_than_its_linears_is_not_folded(tiny_llama_ref):
    """A norm whose output also reaches something besides the linears it feeds (here layer 0's attention adds its
    normed input to its output) would change the model if folded: the fold is checked on the probe's logits and
    undone for that norm alone; the other norms fold."""
    bundle = load_model(tiny_llama_ref)
    model = bundle.module
    model.model.layers[0].self_attn.register_forward_hook(
        lambda m, args, kwargs, out: (out[0] + kwargs["hidden_states"], *out[1:]), with_kwargs=True)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        folded = fold_norms(model)
        after = model(ids).logits
    assert "model.layers.0.input_layernorm" not in folded and len(folded) == 2 * 4
    assert torch.allclose(before, after, atol=1e-4)


def test_norm_gain_forms_fold_and_smooth_exactly(tiny_llama_ref):
    """`gain_offset` tells Llama's RMSNorm (x / rms * w) from Gemma's (x / rms * (1 + w)) by running them, and knows no
    other form; folding and SmoothQuant move the gain itself, so a Gemma's float function stays."""
    import transformers

    from edgeq.quantize.transforms import gain_offset, smooth

    llama = load_model(tiny_llama_ref).module
    assert gain_offset(llama.model.layers[0].input_layernorm) == 0.0
    assert gain_offset(torch.nn.LayerNorm(32, bias=False)) is None and gain_offset(torch.nn.LayerNorm(32)) is None
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "GemmaRMSNorm":
                m.weight.uniform_(-0.5, 0.5)
    norm = model.model.layers[0].input_layernorm
    assert gain_offset(norm) == 1.0
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    absmax = {n: torch.rand(model.get_submodule(n).in_features, generator=torch.Generator().manual_seed(1)) * 50 + 0.1 for n in names}
    with torch.no_grad():
        before = model(ids).logits
        assert len(fold_norms(model)) == 4 and torch.all(norm.weight == 0)  # the gain 1 + 0
        folded = model(ids).logits
        assert smooth(model, absmax, 0.5, names)
        smoothed = model(ids).logits
    assert torch.allclose(before, folded, atol=1e-4, rtol=1e-4)
    assert torch.allclose(before, smoothed, atol=1e-3, rtol=1e-3) and not torch.all(norm.weight == 0)


GPTQ_WITH_HEAD = {"rules": [{"match": ".*", "method": "gptq", "weight": {"bits": 4, "granularity": "group", "group_size": 32}}]}


def test_float_calibration_starts_where_qat_starts(tiny_llama_ref):
    """`calibration.sequential = false` takes SmoothQuant's maxima and the activation ranges from the float model:
    bitwise the layers `edgeq qat` starts from. The sequential pass's grids differ from block 1 on (the blocks before
    feed their quantized outputs) and agree in block 0, whose inputs nothing quantized has touched, up to float
    rounding (its statistics are carried over to the smoothed inputs instead of observed on them)."""
    import dataclasses

    from edgeq.quantize.qat import convert_qat, prepare_qat

    preset = load_recipe("w8a8-static-fc2a16")
    floating = dataclasses.replace(preset, calibration=dataclasses.replace(preset.calibration, sequential=False))

    def layers(make):
        bundle = load_model(tiny_llama_ref)
        return {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in make(bundle, calibration_batches(bundle, "enwiki", 4, 64)).layers().items()}

    ptq = layers(lambda b, batches: quantize_model(b, floating, batches))
    qat = layers(lambda b, batches: convert_qat(prepare_qat(b, floating, "lsq", batches)))
    sequential = layers(lambda b, batches: quantize_model(b, preset, batches))
    assert ptq.keys() == qat.keys() == sequential.keys() and len(ptq) == 4 * 7
    for name, tensors in ptq.items():
        assert tensors.keys() == qat[name].keys(), name
        for k, v in tensors.items():
            assert torch.equal(v, qat[name][k]), (name, k)
    gap = {n: float((ptq[n]["act_scale"] / sequential[n]["act_scale"] - 1).abs()) for n in ptq}
    first = max(g for n, g in gap.items() if n.startswith("model.layers.0."))  # float rounding (smoothed before / after)
    later = min(g for n, g in gap.items() if not n.startswith("model.layers.0."))
    assert first <= 1e-6 < later


def test_float_calibration_takes_gptq_hessians_in_one_pass(tiny_llama_ref):
    """GPTQ with `calibration.sequential = false`: every Hessian (v_proj's attention-mixed ones too) from one float pass,
    so the integers differ from the sequential pass's from block 1 on and the model stays close to FP32."""
    recipe = QuantRecipe.from_dict({**GPTQ_WITH_HEAD, "calibration": {"sequential": False}})
    bundle = load_model(tiny_llama_ref)
    batches = calibration_batches(bundle, "enwiki", 4, 64)
    with torch.no_grad():
        ref = bundle.module(_ids()).logits
    qm = quantize_model(bundle, recipe, batches)
    assert qm.summary()["gptq_value_hessians"] == {"attention": 4} and len(qm.layers()) == 4 * 7 + 1
    sequential = quantize_model(load_model(tiny_llama_ref), QuantRecipe.from_dict(GPTQ_WITH_HEAD), batches).layers()
    same = {n for n, m in qm.layers().items() if torch.equal(m.qweight, sequential[n].qweight)}
    assert {n for n in qm.layers() if n.startswith("model.layers.0.self_attn.")} <= same  # nothing quantized before them
    assert "model.layers.3.mlp.down_proj" not in same
    with torch.no_grad():
        out = qm.model(_ids()).logits
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("recipe", ["w8a8", "gptq-with-head"])
def test_calibration_passes_stop_early_without_changing_a_bit(recipe, tiny_llama_ref, monkeypatch):
    """Calibration passes end once every observer has had its input, and the pass for the layers outside the
    blocks is skipped when none takes statistics (w8a8's dynamic head); a GPTQ head (and v_proj's attention-mixed
    Hessian) still gets everything. Integers, scales and activation grids are bitwise those of full passes."""
    from edgeq.quantize import observers

    def quantized(full: bool):
        bundle = load_model(tiny_llama_ref)
        head_calls = []
        # ran to its end (on a calibration batch: norm folding runs the model on a short probe too)
        bundle.module.lm_head.register_forward_hook(lambda m, i, o: head_calls.append(1) if i[0].shape[1] == 64 else None)
        r = load_recipe("w8a8") if recipe == "w8a8" else QuantRecipe.from_dict(GPTQ_WITH_HEAD)
        with monkeypatch.context() as m:
            if full:  # every pass to the end, as calibration ran before passes could stop
                m.setattr(observers.UntilSeen, "run", lambda self, forward, items: [forward(item) for item in items] and None)
            qm = quantize_model(bundle, r, calibration_batches(bundle, "enwiki", 12, 64))  # 3 batches
        return {n: {k: v.clone() for k, v in layer.state_dict().items()} for n, layer in qm.layers().items()}, len(head_calls), qm

    early, early_calls, qm = quantized(full=False)
    full, full_calls, _ = quantized(full=True)
    assert early.keys() == full.keys() and "lm_head" in early
    for name, tensors in full.items():
        for k, v in tensors.items():
            assert torch.equal(early[name][k], v), (name, k)
    # w8a8 (smoothed inside the block passes) never runs its head: the head's pass, 3 batches, is skipped; a GPTQ
    # head computes once, in the first batch of its pass (which counts the observed layers' calls)
    assert early_calls == (0 if recipe == "w8a8" else 1) and full_calls == 3
    if recipe != "w8a8":
        assert qm.summary()["gptq_value_hessians"] == {"attention": 4}


def test_a_module_called_twice_keeps_every_pass_running_to_the_end():
    from edgeq.quantize.observers import feed_observing_inputs

    shared, last = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    calls = {"last": 0}
    last.register_forward_pre_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))

    def run(model):
        seen = []
        feed_observing_inputs(model, {shared: seen.append}, [(torch.randn(2, 4),) for _ in range(3)])
        return len(seen)

    assert run(torch.nn.Sequential(shared, last)) == 3 and calls["last"] == 1  # stops before `last` after the first pass
    calls["last"] = 0
    assert run(torch.nn.Sequential(shared, shared, last)) == 6 and calls["last"] == 3  # reused: never stops early


def test_smoothing_statistics_carry_over_to_the_smoothed_inputs(tiny_llama_ref):
    """SmoothQuant inside the block passes: ranges and samples taken on x, divided per channel by s, are those of the
    smoothed model's own inputs x / s (observed again after the fact), and every smoothable layer was smoothed."""
    from edgeq.quantize.observers import ActObserver, feed_observing_inputs
    from edgeq.quantize.calibration import calibrate_blockwise
    from edgeq.quantize.ptq import plan
    from edgeq.quantize.transforms import smoothable

    bundle = load_model(tiny_llama_ref)
    model = bundle.module.eval()
    recipe = load_recipe("w8a8")
    fold_norms(model)
    targets = plan(model, recipe)
    among = smoothable(model, {n for n, (_, r) in targets.items() if r.activation.quantized})
    batches = calibration_batches(bundle, "enwiki", 8, 64)
    carried = {}

    def keep(names, stats, bar):  # records the statistics and leaves the float layers in place
        for n in names:
            obs = stats[n][2]
            if obs is not None:
                carried[n] = (obs.lo, obs.hi, obs.qparams("percentile", percentile=99.9))

    with torch.no_grad():
        _, scales = calibrate_blockwise(model, targets, recipe, batches, keep, smooth_layers=among)
    assert sorted(scales) == sorted(among) and len(among) == 4 * 6
    assert any(n.endswith("q_proj") for n in carried) and not any(n.endswith("down_proj") for n in carried)
    again = {n: ActObserver() for n in carried}  # same seed: the same sample positions
    feed_observing_inputs(model, {model.get_submodule(n): again[n].observe for n in carried}, batches, use_cache=False)
    for n, (lo, hi, (scale, zp)) in carried.items():
        assert torch.allclose(lo, again[n].lo, rtol=1e-5, atol=1e-6) and torch.allclose(hi, again[n].hi, rtol=1e-5, atol=1e-6), n
        s2, zp2 = again[n].qparams("percentile", percentile=99.9)
        assert torch.allclose(scale, s2, rtol=1e-5) and abs(int(zp) - int(zp2)) <= 1, n


def test_observer_and_hessian_divide_channels_like_observing_the_divided_input():
    from edgeq.quantize.observers import ActObserver, HessianAccumulator

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 50, 16, generator=g) * torch.linspace(0.1, 20, 16) for _ in range(4)]
    s = torch.rand(16, generator=g) * 4 + 0.25
    a, b = ActObserver(), ActObserver()
    ha, hb = HessianAccumulator(16), HessianAccumulator(16)
    for x in xs:
        a.observe(x)
        b.observe(x / s)
        ha.add(x)
        hb.add(x / s)
    a.divide_channels(s)
    ha.divide_channels(s)
    assert torch.allclose(a.lo, b.lo) and torch.allclose(a.hi, b.hi)
    assert torch.allclose(torch.cat(a.samples), torch.cat(b.samples))
    for method in ("minmax", "percentile", "mse"):
        assert torch.allclose(a.qparams(method)[0], b.qparams(method)[0], rtol=1e-5), method
    assert (ha.result() - hb.result()).abs().max() <= 1e-5 * hb.result().abs().max()  # float32 sums, rounded apart


def test_a_qdir_refuses_a_model_whose_definition_changed(tmp_path):
    """EfficientNet-Lite0 once loaded with Swish where its weights expect ReLU6; a QDIR made then holds grids calibrated
    on that network. model.json records the model's structure, and loading it into another definition fails."""
    from edgeq.models import structure_digest

    bundle = load_model("factories:small_cnn")
    qdir = quantize_model(bundle, QuantRecipe.from_dict({"rules": [{"match": ".*", "weight": {"bits": 8}}]})).save(tmp_path / "q")
    meta = json.loads((qdir / "model.json").read_text())
    fresh = load_model("factories:small_cnn")
    assert meta["structure_sha256"] == fresh.structure == structure_digest(fresh.module)
    load_quantized(qdir)  # the same definition loads
    fresh.module.conv1 = torch.nn.Sequential(fresh.module.conv1, torch.nn.ReLU6())  # an activation swapped in
    assert structure_digest(fresh.module) != meta["structure_sha256"]
    meta["structure_sha256"] = structure_digest(fresh.module)  # as if made from that definition, loaded into this one
    (qdir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeqError, match="was made from another definition of 'factories:small_cnn'"):
        load_quantized(qdir)


def test_a_damaged_qdir_is_refused_in_one_line(tmp_path):
    """model.json records each tensor file's sha256: a changed byte is refused before it is used, and a file safetensors
    cannot read (a directory written before the hashes were recorded) is one line too, not its traceback."""
    bundle = load_model("factories:small_cnn")
    qdir = quantize_model(bundle, QuantRecipe.from_dict({"rules": [{"match": ".*", "weight": {"bits": 8}}]})).save(tmp_path / "q")
    layers = qdir / "layers.safetensors"
    data = bytearray(layers.read_bytes())
    data[-1] ^= 1  # one bit of a tensor, the header intact
    layers.write_bytes(bytes(data))
    with pytest.raises(EdgeqError, match="layers.safetensors is not the file model.json recorded"):
        load_quantized(qdir)
    meta = json.loads((qdir / "model.json").read_text())
    del meta["sha256"]
    (qdir / "model.json").write_text(json.dumps(meta))
    load_quantized(qdir)  # nothing recorded, nothing checked: the bit goes unseen
    floats = qdir / "float.safetensors"
    floats.write_bytes(floats.read_bytes()[:20])
    with pytest.raises(EdgeqError, match=r"float.safetensors cannot be read \(.*\); quantize again"):
        load_quantized(qdir)
