"""`check` classifies the ops of tiny ONNX / TFLite / quant.json inputs; `gate_export` refuses and suggests."""

from __future__ import annotations

import json

import numpy as np
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
    # No FILE.json: ORT fuses it into MatMulNBits at its default accuracy level 4 (int8 compute).
    report = check(onnx_fixtures["int4_block"], "testboard")
    (row,) = report.rows
    assert (row.op, row.signature, row.verdict.support) == ("MatMul", "act=dynamic w=int4/g32", "unsupported")
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


def test_a_runtime_release_the_file_rules_out_is_unsupported(tflite_fixture, tmp_path, profile_dir):
    """A board whose TFLite runtime is tflite-runtime 2.14 (a profile of one) cannot run an INT4 file right, though it
    has a kernel for every op: the file's FILE.json runtime_min says so, `check` reports it and an export gated by the
    board is refused, naming the variants that release runs."""
    import shutil

    from edgeq.export.runtime_min import TFLITE_RUNTIME_MIN
    from edgeq.fileio import sha256_file
    from edgeq.targets import load_profile_file

    text = (profile_dir / "testboard.toml").read_text()
    assert 'package = "ai-edge-litert"\nversion = "2.3"' in text
    old = tmp_path / "oldboard.toml"
    old.write_text(text.replace('name = "testboard"', 'name = "oldboard"')
                   .replace('package = "ai-edge-litert"\nversion = "2.3"', 'package = "tflite-runtime"\nversion = "2.14"'))
    board = load_profile_file(old)
    f = shutil.copy(tflite_fixture["wi4b32"], tmp_path / "w4.tflite")
    meta = {"sha256": sha256_file(f), "variant": "int4", "runtime_min": TFLITE_RUNTIME_MIN["int4"]}
    (tmp_path / "w4.tflite.json").write_text(json.dumps(meta))

    report = check(f, board)
    assert report.status == "unsupported" and report.exit_code == 1
    assert report.runtime_min["support"] == "unsupported"
    assert report.runtime_min["why"].startswith("tflite-runtime 2.14 cannot run this int4 file")
    assert report.render().splitlines()[1].startswith("  unsupported tflite-runtime 2.14 cannot run this int4 file")
    with pytest.raises(EdgeqError, match=r"cannot run this int4 file .*; install ai-edge-litert 2\.3 \(tested\) on the board, "
                       r"or export a variant tflite-runtime 2\.14 runs: fp32, int8 \(--variant\)$"):
        gate_export(str(f), board)
    assert check(f, "testboard").runtime_min is None  # ai-edge-litert 2.3: the release it was tested with
    # a FILE.json of other bytes says nothing of these
    (tmp_path / "w4.tflite.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    assert check(f, board).runtime_min is None


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
    assert "Erf [act=fp16]" in str(exc.value) and "no rule matches" in str(exc.value)
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


def test_bundled_suggestions(onnx_fixtures, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    # rpi4: the fused INT4 path falls back; MatMulNBits at accuracy level 0 is the native rendering.
    with pytest.raises(EdgeqError, match=r"nearest working recipe: w4-g32 with accuracy_level 0"):
        gate_export(onnx_fixtures["int4_block"], "rpi4")
    meta = gate_export(onnx_fixtures["int4_block"], "rpi4", allow_fallback=True).to_metadata()
    assert meta["target"]["status"] == "fallback" and meta["fallbacks"][0]["nodes"] == ["mm_int4"]
    # TensorRT: uint8 activations do not build; symmetric int8 activations do.
    with pytest.raises(EdgeqError, match=r"has no kernel in tensorrt on jetson-orin-nano.*nearest working recipe: w8a8-sym"):
        gate_export(onnx_fixtures["qdq_int8"], "jetson-orin-nano")
    # Jetson Nano's TensorRT has no INT8 at all: keep it float (FP16).
    with pytest.raises(EdgeqError, match=r"nearest working recipe: float"):
        gate_export(onnx_fixtures["qdq_int8"], "jetson-nano", runtime="tensorrt")


def test_plan_static_activations_per_format(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    layer = {"name": "fc", "kind": "linear", "bits": 8, "granularity": "channel",
             "activation": {"mode": "static", "bits": 8}}
    sym = dict(layer, name="fc_sym", activation={"mode": "static", "bits": 8, "symmetric": True})
    qdir = _qdir(tmp_path, [layer, sym])
    onnx_rows = _rows(check(qdir, "jetson-orin-nano", runtime="tensorrt"))
    assert onnx_rows[("MatMul", "act=uint8 w=int8/channel")][0] == "unsupported"
    assert onnx_rows[("MatMul", "act=int8 w=int8/channel")][0] == "native"
    tfl_rows = _rows(check(qdir, "rpi5", runtime="litert-xnnpack"))
    assert tfl_rows == {("FULLY_CONNECTED", "act=int8 w=int8/channel"): ("native", 2, ["fc", "fc_sym"])}


def test_plan_from_real_layer_decisions(tmp_path, monkeypatch):
    """quant.json entries as edgeq.quantize writes them (LayerDecision.to_dict())."""
    modules = pytest.importorskip("edgeq.quantize.modules")
    from edgeq.recipe import ActSpec, WeightSpec

    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    w4 = modules.LayerDecision("blocks.0.fc", "linear", WeightSpec(bits=4, granularity="group", group_size=32),
                               ActSpec(mode="none"), "rtn", 1.0, (64, 64))
    c8 = modules.LayerDecision("conv", "conv2d", WeightSpec(bits=8), ActSpec(mode="static"), "rtn", 1.0, (8, 3, 3, 3))
    qdir = _qdir(tmp_path, [w4.to_dict(), c8.to_dict()])
    onnx_rows = _rows(check(qdir, "rpi5", runtime="onnxruntime-cpu"))
    assert onnx_rows == {("MatMul", "act=fp32 w=int4/g32"): ("native", 1, ["blocks.0.fc"]),
                         ("Conv", "act=uint8 w=int8/channel"): ("native", 1, ["conv"])}
    tfl_rows = _rows(check(qdir, "rpi4", runtime="litert-xnnpack"))
    assert tfl_rows[("FULLY_CONNECTED", "act=dynamic w=int4/g32")][0] == "native"
    assert tfl_rows[("CONV_2D", "act=int8 w=int8/channel")][0] == "native"


def test_gate_on_a_temp_file_with_explicit_format(onnx_fixtures, tmp_path, profile_dir):
    # An exporter gates the file it wrote under a temporary name before renaming it into place.
    tmp = tmp_path / ".model.onnx.1234.tmp"
    tmp.write_bytes(onnx_fixtures["qdq_int8"].read_bytes())
    result = gate_export(tmp, "testboard", fmt="onnx")
    assert result.to_metadata()["target"]["status"] == "native"


def test_accuracy_level_from_export_metadata(onnx_fixtures, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_fixtures["int4_block"].read_bytes())
    assert _rows(check(model, "rpi4"))[("MatMul", "act=dynamic w=int4/g32")][0] == "fallback"
    # edgeq's exporter records the level it checked parity with; level 0 runs CompFp32 natively.
    (tmp_path / "m.onnx.json").write_text(json.dumps({"session_config": {"session.qdq_matmulnbits_accuracy_level": "0"}}))
    assert _rows(check(model, "rpi4"))[("MatMul", "act=fp32 w=int4/g32")][0] == "native"


def test_plan_low_bit_containers(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    qdir = _qdir(tmp_path, [{"name": "fc", "kind": "linear", "weight": {"bits": 3, "granularity": "group", "group_size": 32},
                             "activation": {"mode": "none"}}])
    assert _rows(check(qdir, "rpi5", runtime="onnxruntime-cpu"))[("MatMul", "act=fp32 w=int4/g32")][0] == "native"
    prof = load_profile("rpi4")
    assert prof.supported_weight_bits("litert-xnnpack", acts=["none"]) == [4, 8]  # weight-only TFLite = dynamic range
    assert prof.supported_weight_bits("onnxruntime-cpu", acts=["none"]) == [4]


def test_plan_dynamic_grids_as_the_onnx_export_renders_them(tmp_path, monkeypatch):
    """An 8-bit grid on per-channel weights is MatMulInteger's; before 4-bit blocks the export computes the grid with
    float ops and the fused MatMulNBits reads float inputs, so its kernel is the session's accuracy level's."""
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    token = {"mode": "dynamic", "bits": 8, "granularity": "token", "symmetric": False}
    qdir = _qdir(tmp_path, [
        {"name": "w4", "kind": "linear", "weight": {"bits": 4, "granularity": "group", "group_size": 64}, "activation": token},
        {"name": "w8", "kind": "linear", "weight": {"bits": 8, "granularity": "channel"}, "activation": token}])
    assert _rows(check(qdir, "rpi4", runtime="onnxruntime-cpu")) == {
        ("MatMul", "act=fp32 w=int4/g64"): ("native", 1, ["w4"]), ("MatMul", "act=dynamic w=int8/channel"): ("native", 1, ["w8"])}
    gate_export(qdir, "rpi4", fmt="onnx")
    # at level 4 MatMulNBits quantizes its input again, for CompInt8, which an ARMv8.0 core lacks
    assert _rows(check(qdir, "rpi4", runtime="onnxruntime-cpu", accuracy_level=4))[("MatMul", "act=dynamic w=int4/g64")][0] == "fallback"
    with pytest.raises(EdgeqError, match=r"act=dynamic w=int4/g64.*falls back"):
        gate_export(qdir, "rpi4", fmt="onnx", accuracy_level=4)
    # LiteRT quantizes the rows itself (the hybrid kernels)
    assert set(_rows(check(qdir, "rpi4", runtime="litert-xnnpack"))) == {
        ("FULLY_CONNECTED", "act=dynamic w=int4/g64"), ("FULLY_CONNECTED", "act=dynamic w=int8/channel")}


@pytest.mark.parametrize("after, native", [("QuantizeLinear", True), ("Relu", True), ("Relu zp128", False),
                                           ("Clip6", True), ("Clip6 wide", False), ("Identity", False),
                                           ("QuantizeLinear+Identity", False)])
def test_qdq_conv_is_integer_only_with_its_output_quantized(tmp_path, monkeypatch, after, native):
    """ONNX Runtime turns DequantizeLinear -> Conv into QLinearConv only with a QuantizeLinear on the Conv's output
    (after a Relu / Clip it removes: one that clips nothing the grid does not, so a Relu before a zero point of 0, a
    ReLU6 before a grid ending at 6; all measured); otherwise the Conv runs in float on a weight dequantized every run
    (measured on EfficientNet-Lite0 w8a8, each Conv followed by BatchNormalization: no QLinearConv at all), nor with
    another reader of its output beside the QuantizeLinear (a residual Add: EfficientNet-Lite0's projections stay
    float)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "w_q"),
             numpy_helper.from_array(np.full(4, 0.02, np.float32), "w_s"), numpy_helper.from_array(np.full(4, 128, np.uint8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp0"), numpy_helper.from_array(np.float32(6 / 255), "s6"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w_dq"], axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq"], ["c"], name="conv")]
    if after.startswith("QuantizeLinear"):
        nodes.append(helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["y"]))
        if after == "QuantizeLinear+Identity":
            nodes.append(helper.make_node("Identity", ["c"], ["y2"]))
    elif after.startswith("Relu"):
        out_grid = ["s", "zp"] if after == "Relu zp128" else ["s", "zp0"]
        nodes += [helper.make_node("Relu", ["c"], ["r"]), helper.make_node("QuantizeLinear", ["r", *out_grid], ["y"])]
    elif after.startswith("Clip6"):
        out_grid = ["s", "zp0"] if after == "Clip6 wide" else ["s6", "zp0"]  # a grid reaching 12.75, or 6
        nodes += [helper.make_node("Clip", ["c", "lo", "hi"], ["r"]), helper.make_node("QuantizeLinear", ["r", *out_grid], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    out_type = TensorProto.FLOAT if after == "Identity" else TensorProto.UINT8
    outputs = [helper.make_tensor_value_info("y", out_type, None)]
    if after == "QuantizeLinear+Identity":
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, initializer=inits)
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    conv = next(r for r in check(path, "rpi5").rows if r.op == "Conv")
    assert (conv.signature, conv.verdict.support) == (("act=uint8 w=uint8/channel", "native") if native
                                                     else ("act=fp32 w=uint8/channel", "fallback"))


def test_plan_of_an_image_model_for_onnx(tmp_path, monkeypatch):
    """An image model's classifier is a Gemm in ONNX (2-D input); a dynamic grid before a Conv or Gemm is
    DynamicQuantizeLinear -> DequantizeLinear with the op in float on a weight dequantized every run: a fallback, as
    the written file checks."""
    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    grid = {"mode": "dynamic", "bits": 8, "granularity": "tensor", "symmetric": False}
    layers = [{"name": "conv", "kind": "conv2d", "weight": {"bits": 8, "granularity": "channel"}, "activation": grid},
              {"name": "fc", "kind": "linear", "weight": {"bits": 8, "granularity": "channel"}, "activation": grid}]
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "quant.json").write_text(json.dumps({"kind": "image", "layers": layers}))
    assert {k: v[0] for k, v in _rows(check(tmp_path / "q", "rpi5", runtime="onnxruntime-cpu")).items()} == {
        ("Conv", "act=fp32 w=int8/channel"): "fallback", ("Gemm", "act=fp32 w=int8/channel"): "fallback"}
    (tmp_path / "q" / "quant.json").write_text(json.dumps({"kind": "causal-lm", "layers": layers[1:]}))
    assert _rows(check(tmp_path / "q", "rpi5", runtime="onnxruntime-cpu"))[("MatMul", "act=dynamic w=int8/channel")][0] == "native"


@pytest.mark.parametrize("skip", ["dequantized", "float"])
def test_qdq_add_is_integer_only_with_every_input_dequantized(tmp_path, monkeypatch, skip):
    """A residual Add between a DequantizeLinear and the next QuantizeLinear: ONNX Runtime fuses it into QLinearAdd only
    when its other input is dequantized too; with a float input (another op's output) it stays a float Add, and
    `edgeq check` reports it so, as ORT's optimized graph has it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"]),
             helper.make_node("Sigmoid", ["x"], ["g"])]
    if skip == "dequantized":
        nodes += [helper.make_node("QuantizeLinear", ["g", "s", "zp"], ["g_q"]),
                  helper.make_node("DequantizeLinear", ["g_q", "s", "zp"], ["g_dq"])]
    nodes += [helper.make_node("Add", ["x_dq", "g_dq" if skip == "dequantized" else "g"], ["a"], name="add"),
              helper.make_node("QuantizeLinear", ["a", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializer=inits)
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    fused = "QLinearAdd" in {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert fused == (skip == "dequantized")
    add = next(r for r in check(path, "rpi5").rows if r.op == "Add")
    assert add.signature == ("act=uint8" if fused else "act=fp32")


@pytest.mark.parametrize("bias", ["float", "subgraph", "int32"])
def test_qdq_gemm_bias_forms(tmp_path, monkeypatch, bias):
    """A QDQ Gemm with a float output: ONNX Runtime fuses it into QGemm with no bias or an int32 one behind a
    DequantizeLinear (measured, ORT 1.32), not with a float bias. The int32 bias may be computed from constants (ORT's
    saved BiasQuantization: Mul, Div, Round, Cast), which ORT folds when it loads the file: not ops at run time.
    TensorRT's parser refuses an int32 DequantizeLinear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)
    rng = np.random.default_rng(0)
    k, n = 32, 10
    b = rng.standard_normal(n).astype(np.float32)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (n, k)).astype(np.int8), "w_q"),
             numpy_helper.from_array(np.full(n, 0.02, np.float32), "w_s"), numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_s"), numpy_helper.from_array(np.array(128, np.uint8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w_dq"], name="dq_w", axis=0)]
    if bias == "float":
        inits.append(numpy_helper.from_array(b, "b"))
        gemm_bias = "b"
    else:
        inits.append(numpy_helper.from_array((np.float32(0.05) * np.full(n, 0.02, np.float32)).astype(np.float32), "b_s"))
        if bias == "int32":
            inits.append(numpy_helper.from_array(np.round(b / (0.05 * 0.02)).astype(np.int32), "b_q"))
        else:
            inits.append(numpy_helper.from_array(b, "b"))
            nodes += [helper.make_node("Div", ["b", "b_s"], ["b_div"], name="bias_div"),
                      helper.make_node("Round", ["b_div"], ["b_round"], name="bias_round"),
                      helper.make_node("Cast", ["b_round"], ["b_q"], name="bias_cast", to=TensorProto.INT32)]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b_dq"], name="dq_b", axis=0))
        gemm_bias = "b_dq"
    nodes.append(helper.make_node("Gemm", ["x_dq", "w_dq", gemm_bias], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializer=inits)
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    rows = _rows(check(path, "rpi5", runtime="onnxruntime-cpu"))
    gemm = [v[0] for (op, _), v in rows.items() if op == "Gemm"]
    assert gemm == (["fallback"] if bias == "float" else ["native"]), rows
    assert not [op for op, _ in rows if op in ("Div", "Round", "Cast")], rows
    trt = _rows(check(path, "jetson-orin-nano", runtime="tensorrt"))
    assert (("DequantizeLinear", "act=none w=int32/channel") in trt) == (bias != "float"), trt
    if bias != "float":
        assert trt[("DequantizeLinear", "act=none w=int32/channel")][0] == "unsupported"


LITERT_NAMES = [  # as litert-torch 0.10 names ops of MiniLM-L6's TFLite file (a fused op lists each source op)
    "0:6:edgeq.export.tflite_render._Encoder/transformers.models.bert.modeling_bert.BertModel_m/transformers.models.bert."
    "modeling_bert.BertEmbeddings_embeddings/edgeq.export.tflite_render._UnfoldableLayerNorm_LayerNorm;4",
    "0:9:edgeq.export.tflite_render._Encoder/transformers.models.bert.modeling_bert.BertModel_m/transformers.models.bert."
    "modeling_bert.BertEmbeddings_embeddings/edgeq.export.tflite_render._UnfoldableLayerNorm_LayerNorm;;edgeq.export."
    "tflite_render._Encoder/transformers.models.bert.modeling_bert.BertModel_m/transformers.models.bert.modeling_bert."
    "BertEmbeddings_embeddings;",
    # ... and tiny-llama's full-integer one: an activation ai-edge-quantizer quantizes, an op of the decode wrapper
    "0:11:edgeq.export.tflite_decode.KVPrefill/transformers.models.llama.modeling_llama.LlamaForCausalLM_model/"
    "transformers.models.llama.modeling_llama.LlamaModel_model/transformers.models.llama.modeling_llama."
    "LlamaDecoderLayer_0/edgeq.export.tflite_render._UnfoldableRMSNorm_input_layernorm;6_quantized",
    "1:49:edgeq.export.tflite_decode.KVDecode;25",
]


def test_printed_node_names_are_module_paths(tflite_fixture, profile_dir):
    """`edgeq check` prints a converter's op name as the module path it came from (MiniLM-L6's check was 15 KB of
    qualified class names for a file that ran natively); the JSON keeps the names whole, and names that are not
    scopes (edgeq's layer labels, ONNX's) print as they are."""
    from edgeq.targets.check import short_node

    assert [short_node(n) for n in LITERT_NAMES] == ["0:6:m.embeddings.LayerNorm", "0:9:m.embeddings.LayerNorm + m.embeddings",
                                                     "0:11:model.model.0.input_layernorm_quantized", "1:49:KVDecode"]
    for name in ("0:21:edgeq/encoder.layer.0.attention.self.query_dequant", "/model/layers.0/self_attn/q_proj/MatMul", "fc1"):
        assert short_node(name) == name
    report = check(tflite_fixture["wi8"], "testboard")
    report.rows[0].nodes = LITERT_NAMES
    assert "0:6:m.embeddings.LayerNorm, 0:9:m.embeddings.LayerNorm + m.embeddings" in report.render()
    assert "BertModel_m" not in report.render() and report.to_dict()["ops"][0]["nodes"] == LITERT_NAMES
