"""BatchNorms folded into their convs before quantizing (`transforms.fold_batchnorms`), so that the integers and scales
edgeq decides are the ones both files hold: TFLite has no separate BatchNorm and ONNX Runtime fuses a QDQ Conv only
without one after it. Before, the exporters folded each norm into edgeq's scales, and every CNN file with BatchNorms
(EfficientNet-Lite0's all) said `exact: false`. The exporters' own fold, still used for directories quantized with
`fold_batchnorms = false`, is tested in test_onnx.py and test_tflite.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.export import export
from edgeq.fileio import read_json
from edgeq.models import load_model
from edgeq.models.inputs import calibration_batches
from edgeq.quantize.modules import activations_as
from edgeq.quantize.ptq import quantize_model
from edgeq.quantize.qmodel import load_quantized
from edgeq.recipe import ActSpec, QuantRecipe, load_recipe

BN_CNN = "tests.export.onnx_cnn:batchnorm_cnn"


def _quantize(ref: str, preset: str, out, fold_batchnorms: bool = True):
    bundle = load_model(ref)
    recipe = dataclasses.replace(load_recipe(preset), fold_batchnorms=fold_batchnorms)
    calib = calibration_batches(bundle, "images", 8, 0) if recipe.needs_calibration else None
    return quantize_model(bundle, recipe, calib), out


@pytest.mark.parametrize("preset", ["w8", "w8a8"])
def test_folded_before_quantizing_both_files_hold_edgeqs_scales(tmp_path, preset):
    """Every norm after a conv is folded (negative gains included), the simulation still computes the float model,
    the directory reloads to the same model, and both files read back bitwise: exact, nothing left to fold."""
    float_model, example = load_model(BN_CNN).module, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = float_model(example)
    qm, qdir = _quantize(BN_CNN, preset, tmp_path / "q")
    assert qm.folded_batchnorms == {"stem": "stem_bn", "dw": "dw_bn", "pw": "pw_bn"}
    assert not [m for m in qm.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad(), activations_as(qm.layers(), ActSpec()):
        simulated = qm.model(example)
    assert float((simulated - reference).abs().max()) < 0.05 * float(reference.abs().max())  # 8-bit weights only
    qm.save(qdir)
    summary, meta = read_json(qdir / "quant.json"), read_json(qdir / "model.json")
    assert summary["folded_batchnorms"] == meta["folded_batchnorms"] == qm.folded_batchnorms
    assert summary["tflite"]["note"] is None
    again = load_quantized(qdir)
    assert again.folded_batchnorms == qm.folded_batchnorms
    with torch.no_grad():
        assert torch.equal(again.model(example), qm.model(example))
    for fmt in ("onnx", "tflite"):
        got = export(qdir, fmt, tmp_path / f"m.{fmt}")
        assert got["exact"] is True and not got.get("bn_folded"), (fmt, got.get("readback", got.get("layers")))
        assert got["parity"]["cos_min"] >= 0.999, (fmt, got["parity"])


def test_a_dead_channel_gets_a_scale_its_int32_bias_fits_when_quantized(tmp_path):
    """A norm with a gain of 1e-9 (shift 2) folds into a stem channel of weights ~1e-9, whose output is its bias. On
    a scale fitted to those weights a static int8 input's int32 bias grid cannot hold 2 (ONNX Runtime cast it to
    INT_MIN, ai-edge-quantizer clipped it to ~0). The quantizer gives that channel the least scale its bias fits with
    room to spare and zero integers, says so in quant.json, and both files hold it bitwise and compute it: the
    channel's bias reads back 2 in the TFLite file."""
    from ai_edge_litert.interpreter import Interpreter

    qm, qdir = _quantize("tests.export.onnx_cnn:dead_channel_cnn", "w8a8", tmp_path / "q")
    stem = qm.layers()["stem"]
    assert stem.bias_fit_channels == [2]
    assert torch.count_nonzero(stem.qweight[2]) == 0 and torch.count_nonzero(stem.qweight[[0, 1, 3]]) > 0
    assert abs(float(stem.bias[2]) / (float(stem.act_scale) * float(stem.scale[2]))) < 2**31 - 1
    qm.save(qdir)
    entry = next(e for e in read_json(qdir / "quant.json")["layers"] if e["name"] == "stem")
    assert entry["bias_fit_channels"] == [2]
    onnx_meta = export(qdir, "onnx", tmp_path / "dead.onnx")
    assert onnx_meta["exact"] is True and onnx_meta["parity"]["max_abs"] < 1e-3, onnx_meta["parity"]
    tfl_meta = export(qdir, "tflite", tmp_path / "dead.tflite")
    assert tfl_meta["exact"] is True and tfl_meta["exact_integers"] is True, tfl_meta["readback"]["mismatches"]
    assert tfl_meta["parity"]["within_tolerance"], tfl_meta["parity"]
    it = Interpreter(model_path=str(tmp_path / "dead.tflite"))
    it.allocate_tensors()
    conv = next(op for op in it._get_ops_details() if op["op_name"] == "CONV_2D")  # the stem, first
    bias = it.get_tensor_details()[conv["inputs"][2]]
    values = it.get_tensor(conv["inputs"][2]).astype(np.float64) * bias["quantization_parameters"]["scales"]
    assert abs(values[2] - float(stem.bias[2])) < 1e-3 and abs(float(stem.bias[2]) - 2.0) < 0.1, values[2]


def test_a_norm_whose_conv_output_is_also_read_elsewhere_is_not_folded(tmp_path):
    """Folding rewrites the conv's output: with a skip connection reading it too, the model would change. That norm
    stays (the export leaves it a separate op too), the other is folded, and the model computes what it did."""
    bundle = load_model("tests.export.onnx_cnn:skip_around_norm_cnn")
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = bundle.module(example)
    qm, qdir = _quantize("tests.export.onnx_cnn:skip_around_norm_cnn", "w8a16", tmp_path / "q")
    assert qm.folded_batchnorms == {"stem": "stem_bn"}
    assert isinstance(qm.model.pw_bn, torch.nn.BatchNorm2d)
    with torch.no_grad():
        assert float((qm.model(example) - reference).abs().max()) < 0.05 * float(reference.abs().max())
    qm.save(qdir)
    meta = export(qdir, "onnx", tmp_path / "skip.onnx")
    assert meta["exact"] is True and not meta.get("bn_folded")


def test_fold_batchnorms_false_leaves_them_to_the_export(tmp_path):
    qm, qdir = _quantize(BN_CNN, "w8", tmp_path / "q", fold_batchnorms=False)
    assert qm.folded_batchnorms == {} and isinstance(qm.model.stem_bn, torch.nn.BatchNorm2d)
    qm.save(qdir)
    assert read_json(qdir / "quant.json")["tflite"]["note"]  # scales folded at export: not edgeq's
    meta = export(qdir, "tflite", tmp_path / "m.tflite")
    # the quantized convs' norms (w8 leaves the depthwise conv float: the converter folds its norm)
    assert meta["bn_folded"] == {"stem": "stem_bn", "pw": "pw_bn"} and meta["exact"] is False


def test_recipe_flags_are_booleans():
    rules = [{"match": ".*", "weight": {"bits": 8}}]
    for key in ("fold_batchnorms", "fold_norms", "untie_head"):
        with pytest.raises(EdgeqError, match=f"recipe.{key}: 'false' is not true or false"):
            QuantRecipe.from_dict({"rules": rules, key: "false"})
    assert QuantRecipe.from_dict({"rules": rules, "fold_batchnorms": False}).fold_batchnorms is False


def test_quantize_says_what_it_folded_and_which_channels_it_rescaled(tmp_path, capsys):
    from edgeq.cli.main import main

    out = tmp_path / "q"
    assert main(["quantize", "tests.export.onnx_cnn:dead_channel_cnn", "--recipe", "w8a8", "--calib", "images",
                 "-o", str(out)]) == 0
    said = capsys.readouterr()
    assert "; 3 BatchNorms folded into their layers first" in said.out
    assert "edgeq: note: 1 output channel in 1 layer had weights near zero" in said.err and "bias_fit_channels" in said.err
