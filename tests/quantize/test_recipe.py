"""Recipes are data: presets load, bad files fail with one clear message naming the field."""

import pytest

from edgeq.errors import EdgeqError
from edgeq.recipe import QuantRecipe, load_recipe, preset_names


def test_required_presets_exist_and_load():
    names = preset_names()
    for required in ("w8a8", "w8a8-static", "w8", "w4-g128", "w4-g64", "w4-g128-rtn"):
        assert required in names
        recipe = load_recipe(required)
        assert recipe.rule_for("model.layers.0.mlp.down_proj") is not None
        head = recipe.rule_for("lm_head")  # INT8 presets quantize the head with per-token inputs (as ORT does); the others keep it float
        assert (head.weight.bits, head.activation.granularity) == (8, "token") if required in ("w8", "w8a8") else head is None
    assert load_recipe("w4-g64").rule_for("x").method == "gptq"
    assert load_recipe("w8a8").rule_for("x").activation.mode == "static"
    assert load_recipe("w8a8").rule_for("model.layers.0.mlp.down_proj").activation.granularity == "token"
    assert load_recipe("w8a8-static").rule_for("model.layers.0.mlp.down_proj").activation.mode == "static"


def test_presets_below_8_bits_keep_norm_gains_unfolded():
    """A norm gain folded into a weight below 8 bits widens its groups' range (SmolLM2, RTN, 16 x 512 windows: w4a16
    ppl 34.4 unfolded, 62.8 folded; w4a4 105 against 614; pb-llm 890 against 5,956); the 8-bit presets fold."""
    low = []
    for name in preset_names():
        recipe = load_recipe(name)
        rules = [r for r in recipe.rules if not r.skip]
        below = any(r.weight.bits < 8 or r.method.startswith("pb-llm")
                    or (r.activation.mode != "none" and r.activation.bits < 8) for r in rules)
        assert recipe.fold_norms is not below, name
        low += [name] if below else []
    assert {"w4-g64", "w4-g64-litert", "w4a16", "w4a4", "w4a4-fc2a8", "w16a4", "pb-llm"} <= set(low)
    assert not {"w8", "w8a8", "w8a8-static"} & set(low)


@pytest.mark.parametrize("data,message", [
    ({"rules": [{"match": ".*", "wieght": {}}]}, "unknown key 'wieght'"),
    ({"rules": [{"match": ".*", "weight": {"bits": 9}}]}, "bits: 9 is not an integer in [1, 8], or 16 (the weight stays float)"),
    ({"rules": [{"match": ".*", "weight": {"granularity": "group", "group_size": 100}}]}, "not a power of two"),
    ({"rules": [{"match": "(", "weight": {}}]}, "is not a regular expression"),
    ({"rules": [{"match": ".*", "method": "magic"}]}, "method: 'magic' is not one of"),
    ({"rules": [{"match": ".*", "activation": {"mode": "static", "granularity": "token"}}]}, "static activations are per-tensor"),
    ({"rules": [{"match": ".*", "activation": {"mode": "static", "bits": 16}}]}, "or 16-bit symmetric (int16, LiteRT's 16x8 mode; got 16-bit asymmetric)"),
    ({"rules": [{"match": ".*", "activation": {"mode": "static", "bits": 12, "symmetric": True}}]}, "got 12-bit symmetric"),
    ({"rules": []}, "non-empty list of rules"),
    ({"rules": [{"match": ".*"}], "extra": 1}, "unknown key 'extra'"),
    ({"rules": [{"match": ".*"}], "calibration": {"sequential": "no"}}, "calibration.sequential: 'no' is not true or false"),
    ({"rules": [{"match": ".*", "kind": "dw"}]}, "rules[0].kind: 'dw' is not one of"),
    ({"rules": [{"match": ".*", "kind": []}]}, "is not a layer kind or a list of them"),
])
def test_invalid_recipes_name_the_field(data, message):
    with pytest.raises(EdgeqError, match=None) as err:
        QuantRecipe.from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_recipe_files_toml_and_yaml(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[[rules]]\nmatch = "fc"\nweight = { bits = 4, granularity = "group", group_size = 32 }\n')
    assert load_recipe(toml).rule_for("model.fc").weight.group_size == 32
    assert load_recipe(toml).rule_for("conv") is None
    yaml = tmp_path / "r.yaml"
    yaml.write_text("rules:\n  - match: '.*'\n    weight: {bits: 3}\n")
    assert load_recipe(yaml).rules[0].weight.bits == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("rules = [")
    with pytest.raises(EdgeqError, match="cannot parse"):
        load_recipe(bad)
    with pytest.raises(EdgeqError, match="neither a preset"):
        load_recipe("w9")


def test_recipe_round_trips_through_toml(tmp_path):
    from edgeq.recipe import dump_recipe_toml

    recipe = load_recipe("w4-g128")
    path = tmp_path / "again.toml"
    path.write_text(dump_recipe_toml(recipe))
    again = load_recipe(path)
    assert again.rules == recipe.rules and again.gptq == recipe.gptq


def test_a_rule_can_select_layers_by_kind(tmp_path):
    """`kind` narrows a rule to linear layers, convs, or depthwise convs (groups = input channels > 1, which are convs
    too). The dynamic-activation presets keep depthwise convs float: XNNPACK has no dynamic depthwise kernel (it
    leaves them on built-in kernels, measured in tests/export/test_tflite.py)."""
    import torch

    from edgeq.quantize.ptq import plan

    recipe = QuantRecipe.from_dict({"rules": [{"match": ".*", "kind": ["depthwise"], "weight": {"bits": 4}},
                                              {"match": ".*", "kind": "conv2d", "skip": True},
                                              {"match": ".*", "weight": {"bits": 8}}]})
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Conv2d(8, 16, 1),
                                torch.nn.Conv2d(16, 16, 3, groups=4), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    chosen = {name: rule.weight.bits for name, (_, rule) in plan(model, recipe).items()}
    assert chosen == {"0": 4, "4": 8}  # the depthwise conv; the other convs (a grouped one is not depthwise) skipped
    path = tmp_path / "again.toml"
    from edgeq.recipe import dump_recipe_toml

    path.write_text(dump_recipe_toml(recipe))
    assert load_recipe(path).rules == recipe.rules
    for name in ("w8", "w8-fast", "w8-tensor", "w8a16"):
        dynamic = load_recipe(name)
        assert dynamic.rule_for("features.3.conv", ("conv2d", "depthwise")) is None
        assert dynamic.rule_for("features.3.conv", ("conv2d",)) is not None


FC2_NAMES = {  # each family's MLP second linear (a small random model of each, transformers 5.25)
    "llama": "model.layers.0.mlp.down_proj", "opt": "model.decoder.layers.0.fc2", "phi": "model.layers.0.mlp.fc2",
    "gpt2": "transformer.h.0.mlp.c_proj", "gpt-neox": "gpt_neox.layers.0.mlp.dense_4h_to_h",
    "falcon": "transformer.h.0.mlp.dense_4h_to_h", "bert": "encoder.layer.0.output.dense",
    "distilbert": "transformer.layer.0.ffn.lin2", "albert": "encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
    "modernbert": "layers.0.mlp.Wo",
}
NOT_FC2 = ["encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense", "transformer.h.0.attn.c_proj",
           "model.layers.0.mlp.up_proj", "gpt_neox.layers.0.mlp.dense_h_to_4h", "transformer.layer.0.ffn.lin1",
           "encoder.albert_layer_groups.0.albert_layers.0.ffn", "model.layers.0.self_attn.o_proj", "pooler.dense"]


@pytest.mark.parametrize("preset,bits", [("w8a8-static-fc2a16", 16), ("w4a4-fc2a8", 8)])
def test_fc2_presets_name_every_familys_fc2(preset, bits):
    """The FC2 rule of the presets built on it names the MLP's second linear in every family edgeq checks, and no other
    layer: it named Llama's and OPT's only, so `w8a8-static-fc2a16` gave a BERT encoder no 16-bit layer (MiniLM-L6's
    full-integer TFLite embeddings at cosine 0.947 with FP32; 0.995 with its FC2s at 16 bits)."""
    from edgeq.quantize.diagnostics import FC2

    recipe = load_recipe(preset)
    fc2_rule = next(r for r in recipe.rules if r.match == FC2)
    for family, name in FC2_NAMES.items():
        assert recipe.rule_for(name) is fc2_rule and fc2_rule.activation.bits == bits, family
    for name in NOT_FC2:
        assert recipe.rule_for(name) is not fc2_rule, name


def test_a_rule_that_decides_no_layer_is_recorded_and_said(tmp_path, capsys):
    from edgeq.cli.main import main
    from edgeq.models import load_model
    from edgeq.quantize.ptq import quantize_model

    recipe = QuantRecipe.from_dict({"rules": [{"match": "fc2$", "weight": {"bits": 4}}, {"match": "conv", "weight": {"bits": 8}},
                                              {"match": "conv1", "weight": {"bits": 4}}, {"match": ".*", "skip": True}]})
    qm = quantize_model(load_model("factories:small_cnn"), recipe)
    assert qm.extra["rules_matching_no_layer"] == [{"rule": 0, "match": "fc2$"}, {"rule": 2, "match": "conv1"}]  # (conv takes conv1)
    assert main(["quantize", "factories:small_cnn", "--recipe", "w8a8-static-fc2a16", "-o", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "edgeq: note: recipe 'w8a8-static-fc2a16' rule 1 (match \"(down_proj|fc2|" in err and "decides no layer of 'factories:small_cnn'" in err
