"""Hugging Face image classifiers from local directories: loaded as image models (their preprocessor's crop and
normalisation), quantized and exported to both formats with edgeq's integers held exactly. Small random models of
the families that each needed something (tools/check_vision_families.py checks more, benchmarks/vision_families.md):
MobileNetV2 (its TF-style padding reads its convs' stride), ConvNeXt (channels-first LayerNorm, a layer scale the
converter would fold into pwconv2), EfficientNet (global pooling as a 1280-wide AvgPool2d, whose count correction the
converter would fold into the classifier), Swin (stages that do not chain in sequential calibration), ViT (sdpa,
which the converter would lower into its query and key weights) and LeViT (a BatchNorm1d after its linear layers,
which the converter would fold into their weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeq.export import export
from edgeq.models import load_model
from edgeq.models.inputs import calibration_batches, image_inputs
from edgeq.quantize.ptq import quantize_model
from edgeq.recipe import load_recipe

SIZE = 64


def _configs():
    import transformers as t

    labels = dict(num_labels=10, image_size=SIZE)
    return {
        "mobilenet_v2": t.MobileNetV2Config(depth_multiplier=0.35, **labels),
        "convnext": t.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10, image_size=SIZE),
        "efficientnet": t.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, **labels),
        "swin": t.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, patch_size=4, **labels),
        "vit": t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           patch_size=16, **labels),
        "levit": t.LevitConfig(hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                               patch_size=16, architectures=["LevitForImageClassification"], **labels),
    }


def _save(family: str, path) -> str:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(_configs()[family]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # trained-looking statistics
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(getattr(m, "layer_scale_parameter", None), torch.Tensor):
                m.layer_scale_parameter.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", list(_configs()))
def test_a_hugging_face_image_classifier_quantizes_and_exports_exactly(tmp_path, family):
    ref = _save(family, tmp_path / family)
    bundle = load_model(ref)
    assert bundle.kind == "image" and tuple(bundle.example_inputs[0].shape) == (1, 3, SIZE, SIZE)
    recipe = load_recipe("w8a8-static")
    qm = quantize_model(bundle, recipe, calibration_batches(bundle, None, 8, 0))
    images = torch.from_numpy(image_inputs(load_model(ref), "images", 4, "evaluation"))
    with torch.no_grad():
        reference = load_model(ref).module(images).logits
        simulated = qm.model(images).logits
    assert torch.nn.functional.cosine_similarity(simulated.flatten(), reference.flatten(), dim=0) > 0.9
    qdir = qm.save(tmp_path / "q")
    for fmt in ("tflite", "onnx"):
        meta = export(qdir, fmt, tmp_path / f"m.{fmt}")
        assert meta["variant"] == "int8" and meta["exact"] is True, (fmt, meta.get("readback"))
        # TFLite's int8 file requantizes each layer's output, which the simulation does not: its own tolerance
        assert meta["parity"]["within_tolerance"] if fmt == "tflite" else meta["parity"]["cos_min"] >= 0.999, meta["parity"]


@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_auto_plans_a_hugging_face_mobilenet_s_convolutions(tmp_path, activation):
    """`--recipe auto` on Hugging Face's MobileNetV2 (TF-style padding modules around its convs, BatchNorms after them):
    the plan quantizes some convolutions and keeps others float, the QDIR reloads computing bitwise the same, and its
    TFLite file holds every quantized layer exactly."""
    from edgeq.quantize.mixed import MixedOptions, auto_quantize
    from edgeq.quantize.qmodel import load_quantized

    ref = _save("mobilenet_v2", tmp_path / "m")
    bundle = load_model(ref)
    options = MixedOptions(runtime="litert-xnnpack", activation=activation, measure="none")
    qm = auto_quantize(bundle, "rpi5", "40%", calibration_batches(bundle, None, 4, 0, batch_size=1), options=options)
    mixed, summary = qm.extra["mixed"], qm.summary()
    assert mixed["convolutions_kept_float"] and summary["folded_batchnorms"]
    assert any(e["kind"] == "conv2d" for e in summary["layers"]) and summary["bytes_after"] == mixed["planned_bytes"]
    qdir = qm.save(tmp_path / "q")
    images = torch.from_numpy(image_inputs(load_model(ref), "images", 2, "evaluation"))
    with torch.no_grad():
        assert torch.equal(load_quantized(qdir).model(images).logits, qm.model(images).logits)
    meta = export(qdir, "tflite", tmp_path / "m.tflite")
    assert meta["variant"] == ("int8" if activation == "static" else "dynamic-int8") and meta["exact"] is True


def test_swins_stages_are_calibrated_in_one_pass_and_decoders_layers_in_sequence(tmp_path, tiny_llama_ref):
    """Sequential calibration feeds each block the one before's output with the first block's other arguments. Swin's
    stages take their own map size, so they do not chain (stage 1 got stage 0's and failed); they are calibrated in
    one pass of the model instead. A decoder's layers chain."""
    from edgeq.quantize.calibration import calibration_blocks, find_blocks

    swin = load_model(_save("swin", tmp_path / "swin"))
    assert find_blocks(swin.module) is not None
    assert calibration_blocks(swin.module, calibration_batches(swin, None, 4, 0)) is None
    llama = load_model(tiny_llama_ref)
    assert calibration_blocks(llama.module, calibration_batches(llama, None, 4, 32))[0] == "model.layers"


def test_the_preprocessors_crop_and_normalisation_make_the_inputs(tmp_path):
    ref = _save("mobilenet_v2", tmp_path / "m")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 48, "width": 48}, "size": {"shortest_edge": 56}, "image_mean": mean, "image_std": std}))
    bundle = load_model(ref)
    assert tuple(bundle.example_inputs[0].shape) == (1, 3, 48, 48)
    images = image_inputs(bundle, "images", 2, "evaluation")
    assert images.shape == (2, 3, 48, 48)
    # per-channel normalisation: undone, every channel is back in [0, 1]
    pixels = images * np.array(std)[None, :, None, None] + np.array(mean)[None, :, None, None]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_grouped_convolutions_are_refused_for_tflite_naming_the_rule_that_leaves_them_float(tmp_path):
    """RegNet's grouped convolutions (neither plain nor depthwise) have no quantized TFLite kernel: quant.json says so
    at quantize time, the export refuses before converting, and the skip rule the message names gives a file."""
    import transformers

    from edgeq.errors import EdgeqError
    from edgeq.recipe import QuantRecipe

    torch.manual_seed(0)
    config = transformers.RegNetConfig(embedding_size=16, groups_width=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    transformers.AutoModelForImageClassification.from_config(config).eval().save_pretrained(tmp_path / "regnet")
    ref = str(tmp_path / "regnet")
    bundle = load_model(ref)
    qdir = quantize_model(bundle, load_recipe("w8"), calibration_batches(bundle, None, 4, 0)).save(tmp_path / "q")
    said = json.loads((qdir / "quant.json").read_text())["tflite"]["variants"]["dynamic-int8"]
    assert said["representable"] is False and "grouped convolutions" in said["why"]
    with pytest.raises(EdgeqError, match=r"grouped convolutions other than depthwise.*skip = true.*--format onnx"):
        export(qdir, "tflite", tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
    recipe = QuantRecipe.from_dict({"name": "w8-float-grouped", "rules": [
        {"match": r"layer\.1\.convolution$", "skip": True},  # RegNet's grouped convs
        {"match": ".*", "kind": ["depthwise"], "skip": True},
        {"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "dynamic", "granularity": "token", "symmetric": True}}]})
    qdir = quantize_model(load_model(ref), recipe).save(tmp_path / "q2")
    assert export(qdir, "tflite", tmp_path / "m.tflite")["exact"] is True
