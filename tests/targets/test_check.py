"""`check` classifies the ops of tiny ONNX / TFLite / quant.json inputs; `gate_export` refuses and suggests."""

from __future__ import annotations

import json

import pytest

from edgeq.errors import EdgeqError
from edgeq.targets import OpUse, check, gate_export, load_profile


def _rows(report):
    return {(r.op, r.signature): (r.verdict.support, r.count, r.nodes) for r in report.rows}


def test_qdq_int8_matmul_is_native(onnx_fixtures, profile_dir):
    report = check(onnx_fixtures["qdq_int8"], "testboard")
    rows = _rows(report)
    assert rows[("MatMul", "act=uint8 w=int8/channel")] == ("native", 1, ["mm_int8"])
    # The activation QuantizeLinear runs on its own; the DequantizeLinears are folded into the MatMul.
    assert rows[("QuantizeLinear", "act=fp32")][0] == "native"
    assert not any(op == "DequantizeLinear" for op, _ in rows)
    assert report.status == "native" and report.exit_code == 0


def test_int4_blocked_dequantize_matmul_is_unsupported(onnx_fixtures, profile_dir):
    report = check(onnx_fixtures["int4_block"], "testboard")
    (row,) = report.rows
    assert (row.op, row.signature, row.verdict.support) == ("MatMul", "act=fp32 w=int4/g32", "unsupported")
    assert row.verdict.why == "no int4 kernel"
    assert row.suggestion == "w8"
    assert report.exit_code == 1


def test_matmulnbits_falls_back(onnx_fixtures, profile_dir):
    report = check(onnx_fixtures["matmulnbits"], "testboard")
    (row,) = report.rows
    assert row.op == "MatMulNBits" and row.signature == "act=fp32 w=int4/g32"
    assert row.verdict.support == "fallback" and row.verdict.fallback_to == "dequantize then fp32 GEMM"
    assert report.status == "fallback"


def test_float_graph_is_native(onnx_fixtures, profile_dir):
    rows = _rows(check(onnx_fixtures["float"], "testboard"))
    assert rows == {("MatMul", "act=fp32 w=fp32"): ("native", 1, ["mm_f32"]),
                    ("Softmax", "act=fp32"): ("native", 1, ["softmax"])}


def test_bundled_profiles_on_onnx_fixtures(onnx_fixtures, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    # rpi4 (Cortex-A72, no dot product): the default accuracy level 4 cannot use CompInt8 kernels.
    assert check(onnx_fixtures["int4_block"], "rpi4").status == "fallback"
    assert check(onnx_fixtures["int4_block"], "rpi5").status == "native"
    assert check(onnx_fixtures["qdq_int8"], "rpi5").status == "native"
    # TensorRT wants symmetric int8 (zero point 0): uint8 QDQ activations are refused.
    assert check(onnx_fixtures["qdq_int8"], "jetson-orin-nano", runtime="tensorrt").status == "unsupported"
    assert check(onnx_fixtures["float"], "jetson-nano", runtime="tensorrt").status == "native"


def test_tflite_fixture(tflite_fixture, profile_dir):
    rows = _rows(check(tflite_fixture["wi8"], "testboard"))
    fc = rows[("FULLY_CONNECTED", "act=dynamic w=int8/channel")]
    assert fc[:2] == ("native", 2)
    assert rows[("SOFTMAX", "act=fp32")][0] == "native"
    report4 = check(tflite_fixture["wi4b32"], "testboard")
    assert _rows(report4)[("FULLY_CONNECTED", "act=dynamic w=int4/g32")][:2] == ("fallback", 2)
    assert check(tflite_fixture["fp32"], "testboard").status == "native"


def test_tflite_on_bundled_profiles(tflite_fixture, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    for target in ("rpi4", "rpi5", "x86-64"):
        assert check(tflite_fixture["wi4b32"], target).status == "native", target


def _qdir(tmp_path, layers):
    qdir = tmp_path / "q"
    qdir.mkdir()
    (qdir / "quant.json").write_text(json.dumps({"layers": layers}))
    return qdir


def test_plan_check_and_gate(tmp_path, profile_dir):
    qdir = _qdir(tmp_path, [
        {"name": "blocks.0.attn", "kind": "linear", "bits": 4, "symmetric": True, "granularity": "group",
         "group_size": 32, "activation": {"mode": "none"}},
        {"name": "blocks.0.mlp", "kind": "linear", "weight": {"bits": 8, "granularity": "channel"}},
        {"name": "head", "kind": "linear", "bits": 16},
    ])
    report = check(qdir, "testboard", runtime="ort")
    rows = _rows(report)
    assert rows[("MatMul", "act=fp32 w=int4/g32")] == ("unsupported", 1, ["blocks.0.attn"])
    assert rows[("MatMul", "act=fp32 w=int8/channel")][0] == "native"
    with pytest.raises(EdgeqError) as exc:
        gate_export(qdir, "testboard", fmt="onnx")
    msg = str(exc.value)
    assert "MatMul [act=fp32 w=int4/g32]" in msg and "has no kernel in ort on testboard" in msg
    assert "nearest working recipe: w8" in msg


def test_gate_fallback_needs_permission(onnx_fixtures, profile_dir):
    with pytest.raises(EdgeqError, match="falls back to dequantize then fp32 GEMM.*--allow-fallback"):
        gate_export(onnx_fixtures["matmulnbits"], "testboard")
    result = gate_export(onnx_fixtures["matmulnbits"], "testboard", allow_fallback=True)
    meta = result.to_metadata()
    assert meta["target"] == {"name": "testboard", "runtime": "ort", "format": "onnx", "status": "fallback"}
    assert meta["fallbacks"][0]["op"] == "MatMulNBits" and meta["fallbacks"][0]["nodes"] == ["mm_nbits"]
    assert gate_export(onnx_fixtures["qdq_int8"], "testboard").to_metadata()["fallbacks"] == []


def test_gate_on_op_uses_and_unknown_ops(profile_dir):
    uses = [OpUse("MatMul", "fp32", "int4", "group", 128, node="l0"), OpUse("Erf", "fp16", node="e")]
    with pytest.raises(EdgeqError) as exc:
        gate_export(uses, "testboard", runtime="ort")
    assert "Erf [act=fp16]" in str(exc.value) and "no rule" in str(exc.value)
    prof = load_profile("testboard")
    assert prof.classify(OpUse("Relu", "fp32"), "ort").support == "native"


def test_bad_inputs(tmp_path, profile_dir):
    with pytest.raises(EdgeqError, match="no such file"):
        check(tmp_path / "missing.onnx", "testboard")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgeqError, match="not a readable ONNX model"):
        check(bad, "testboard")
    badt = tmp_path / "bad.tflite"
    badt.write_bytes(b"1234TFL3" + b"\0" * 8)
    with pytest.raises(EdgeqError, match="TFLite"):
        check(badt, "testboard")
    with pytest.raises(EdgeqError, match="no quant.json"):
        check(tmp_path, "testboard", runtime="ort")
    with pytest.raises(EdgeqError, match="not a runtime of testboard"):
        check(tmp_path, "testboard", runtime="tensorrt")
