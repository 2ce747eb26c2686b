"""Fixtures for target-profile tests: the test profile, tiny ONNX graphs and one tiny TFLite model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
TEST_PROFILE = HERE / "profiles" / "testboard.toml"


@pytest.fixture
def profile_dir(monkeypatch):
    """Put the test profile first on the search path."""
    monkeypatch.setenv("EDGEQ_PROFILES", str(TEST_PROFILE.parent))
    return TEST_PROFILE.parent


def _save(model, path: Path) -> Path:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _model(nodes, inits, inputs, outputs, ms_domain=False):
    from onnx import helper

    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_domain else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


@pytest.fixture(scope="session")
def onnx_fixtures(tmp_path_factory) -> dict[str, Path]:
    """name -> path of a tiny ONNX graph (built with onnx.helper, seeded)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    out = tmp_path_factory.mktemp("onnx")
    rng = np.random.default_rng(0)
    f32 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    K, N = 64, 16
    paths = {}

    # QDQ INT8: uint8 activations, int8 per-channel weights.
    w8 = numpy_helper.from_array(rng.integers(-127, 128, (K, N)).astype(np.int8), "w_q")
    inits = [w8, numpy_helper.from_array(np.full(N, 0.02, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w_dq"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm_int8")]
    paths["qdq_int8"] = _save(_model(nodes, inits, [f32("x", [1, K])], [f32("y", [1, N])]), out / "qdq_int8.onnx")

    # INT4 blocked DequantizeLinear (block 32 along K) + MatMul, float activations.
    import ml_dtypes

    w4 = numpy_helper.from_array(rng.integers(-8, 8, (K, N)).astype(ml_dtypes.int4), "w4")
    inits = [w4, numpy_helper.from_array(np.full((K // 32, N), 0.1, np.float32), "w4_s")]
    nodes = [helper.make_node("DequantizeLinear", ["w4", "w4_s"], ["w4_dq"], name="dq_w4", axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "w4_dq"], ["y"], name="mm_int4")]
    paths["int4_block"] = _save(_model(nodes, inits, [f32("x", [1, K])], [f32("y", [1, N])]), out / "int4.onnx")

    # MatMulNBits (com.microsoft), 4 bits, block 32.
    packed = numpy_helper.from_array(rng.integers(0, 256, (N, K // 32, 16)).astype(np.uint8), "b_packed")
    inits = [packed, numpy_helper.from_array(np.full(N * (K // 32), 0.1, np.float32), "b_s")]
    nodes = [helper.make_node("MatMulNBits", ["x", "b_packed", "b_s"], ["y"], name="mm_nbits", domain="com.microsoft",
                              K=K, N=N, bits=4, block_size=32, accuracy_level=0)]
    model = _model(nodes, inits, [f32("x", [1, K])], [f32("y", [1, N])], ms_domain=True)
    import onnx

    onnx.save(model, str(out / "nbits.onnx"))  # the checker does not know contrib ops
    paths["matmulnbits"] = out / "nbits.onnx"

    # Float MatMul + Softmax.
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm_f32"),
             helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1)]
    paths["float"] = _save(_model(nodes, inits, [f32("x", [1, K])], [f32("y", [1, N])]), out / "float.onnx")
    return paths


def _tiny_tflite(path: Path) -> Path:
    """x[1,64] -> FULLY_CONNECTED(32, relu) -> FULLY_CONNECTED(16) -> SOFTMAX, written with the schema's object API.

    Built by hand (seeded) rather than converted from PyTorch: the converter stack takes tens of
    seconds to import, this takes milliseconds and gives the same ops.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(0)
    model = s.ModelT()
    model.version, model.description, model.buffers = 3, "edgeq test fixture", [s.BufferT()]

    def tensor(name, shape, data=None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), s.TensorType.FLOAT32, 0
        if data is not None:
            buf = s.BufferT()
            buf.data = np.frombuffer(data.astype(np.float32).tobytes(), np.uint8).tolist()
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        return t

    def operator(code, inputs, outputs, options_type, options):
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, outputs
        op.builtinOptionsType, op.builtinOptions = options_type, options
        return op

    sg = s.SubGraphT()
    sg.tensors = [tensor("x", (1, 64)), tensor("fc1/w", (32, 64), rng.standard_normal((32, 64)) * 0.1),
                  tensor("fc1/b", (32,), np.zeros(32)), tensor("h", (1, 32)),
                  tensor("fc2/w", (16, 32), rng.standard_normal((16, 32)) * 0.1), tensor("fc2/b", (16,), np.zeros(16)),
                  tensor("h2", (1, 16)), tensor("y", (1, 16))]
    model.operatorCodes = []
    for code in (s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.SOFTMAX):
        oc = s.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, code, 1
        model.operatorCodes.append(oc)
    relu, none = s.FullyConnectedOptionsT(), s.FullyConnectedOptionsT()
    relu.fusedActivationFunction = s.ActivationFunctionType.RELU
    softmax = s.SoftmaxOptionsT()
    softmax.beta = 1.0
    fc = s.BuiltinOptions.FullyConnectedOptions
    sg.operators = [operator(0, [0, 1, 2], [3], fc, relu), operator(0, [3, 4, 5], [6], fc, none),
                    operator(1, [6], [7], s.BuiltinOptions.SoftmaxOptions, softmax)]
    sg.inputs, sg.outputs, sg.name = [0], [7], "main"
    model.subgraphs = [sg]
    sig, tin, tout = s.SignatureDefT(), s.TensorMapT(), s.TensorMapT()
    tin.name, tin.tensorIndex, tout.name, tout.tensorIndex = "args_0", 0, "output_0", 7
    sig.signatureKey, sig.subgraphIndex, sig.inputs, sig.outputs = "serving_default", 0, [tin], [tout]
    model.signatureDefs = [sig]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture(scope="session")
def tflite_fixture(tmp_path_factory) -> dict[str, Path]:
    """The tiny TFLite model as fp32 and quantized by ai-edge-quantizer (dynamic_wi8, dynamic_wi4b32)."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("ai_edge_quantizer")
    from ai_edge_quantizer import quantizer, recipe

    out = tmp_path_factory.mktemp("tflite")
    try:
        paths = {"fp32": _tiny_tflite(out / "fp32.tflite")}
        for name, rec in (("wi8", recipe.dynamic_wi8_afp32()), ("wi4b32", recipe.dynamic_wi4b32_afp32())):
            qt = quantizer.Quantizer(str(paths["fp32"]))
            qt.load_quantization_recipe(rec)
            qt.quantize().export_model(str(out / f"{name}.tflite"), overwrite=True)
            paths[name] = out / f"{name}.tflite"
    except Exception as exc:  # a broken LiteRT install must not fail the suite
        pytest.skip(f"cannot build the TFLite fixture here: {type(exc).__name__}: {exc}")
    return paths
