"""An LR-QAT quantized-model directory exports to ONNX and TFLite exactly (the exporters read it unchanged)."""

import pytest

from edgeq.quantize.qat_loop import QATConfig, run_qat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lrqat_qdir(tiny_llama_ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("lrqat") / "q"
    cfg = QATConfig(model=tiny_llama_ref, recipe="w4a16", method="lr-qat", rank=4, lr=1e-3, steps=2, batch=2, seq_len=32,
                    eval_windows=0)
    run_qat(cfg, out)
    return out


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_lrqat_qdir_exports_exactly(lrqat_qdir, tmp_path, fmt):
    from edgeq.export import export

    meta = export(lrqat_qdir, fmt, tmp_path / f"m.{fmt}")
    assert meta["exact"] is True
    assert meta["parity"]["top1_agree"] >= 0.99


def test_distilled_full_integer_qat_qdir_exports_exactly_to_tflite(tiny_llama_ref, tmp_path):
    """The path to a full-integer file that agrees with FP32: QAT (KD, through the file's output grids) of a smoothed
    static-INT8 recipe, then --variant int8."""
    import json

    from edgeq.export import export

    cfg = QATConfig(model=tiny_llama_ref, recipe="w8a8-static-fc2a16", loss="kd", output_grids=True, steps=2, batch=2, seq_len=32,
                    eval_windows=0)
    run_qat(cfg, tmp_path / "q")
    quant = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert quant["qat_output_grids"]["layers"] == 4 * 7 and quant["qat"]["config"]["output_grids"] is True
    meta = export(tmp_path / "q", "tflite", tmp_path / "m.tflite", variant="int8")
    assert meta["exact"] is True
    assert meta["parity"]["top1_agree"] >= 0.9
