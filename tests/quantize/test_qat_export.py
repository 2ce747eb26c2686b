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
