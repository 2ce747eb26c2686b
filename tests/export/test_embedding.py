"""Quantized input embeddings: the recipe's [embedding] table, a tied LM head sharing its integers,
the QDIR round trip with one stored copy, the ONNX rendering (Gather of integer rows and the head
through DequantizeLinear of the same table; packed 4-bit blocks read by GatherBlockQuantized and
MatMulNBits) and the TFLite one (EMBEDDING_LOOKUP and the head on one int8 tensor)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeq.errors import EdgeqError
from edgeq.export import export
from edgeq.export.onnx_runtime import OnnxRunner
from edgeq.models import load_model
from edgeq.quantize.modules import QuantEmbedding, QuantLinear
from edgeq.quantize.ptq import quantize_model
from edgeq.quantize.qmodel import load_quantized
from edgeq.recipe import QuantRecipe

RULES = [{"match": "lm_head$", "skip": True},
         {"match": ".*", "weight": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64, "scale_dtype": "bf16"}}]


def _recipe(**embedding) -> QuantRecipe:
    return QuantRecipe.from_dict({"name": "w4-emb", "fold_norms": False, "rules": RULES, "embedding": embedding})


def _tied_tiny_llama():
    bundle = load_model("tiny-llama")
    model = bundle.module
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return bundle


@pytest.fixture(scope="module")
def tied_qdir(tmp_path_factory, tiny_llama_ref):
    bundle = _tied_tiny_llama()
    qm = quantize_model(bundle, _recipe(bits=8))
    qdir = tmp_path_factory.mktemp("emb") / "q"
    qm.save(qdir)
    return qm, qdir


def test_tied_head_shares_the_embedding_integers(tied_qdir):
    qm, qdir = tied_qdir
    emb, head = qm.model.model.embed_tokens, qm.model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is emb.qweight and head.decision.method == "tied"
    q = emb.qweight.float()
    assert emb.qweight.dtype == torch.int8 and q.abs().max() <= 127
    ids = torch.tensor([[3, 7, 255]])
    assert torch.equal(emb(ids)[0], q[ids[0]] * emb.scale[ids[0]])  # (q - 0) * per-row scale
    summary = qm.summary()
    entries = {e["name"]: e for e in summary["layers"]}
    assert entries["lm_head"]["tied_to"] == "model.embed_tokens" and entries["lm_head"]["bytes_quant"] == 0
    assert entries["model.embed_tokens"]["bytes_quant"] == 256 * 128 + 256 * 4  # int8 table + fp32 row scales
    assert summary["bytes_after"] == sum(e["bytes_quant"] for e in summary["layers"]) + _float_bytes(qm)


def _float_bytes(qm) -> int:
    from edgeq.quantize.qmodel import unique_float_tensors

    return sum(t.numel() * t.element_size() for t in unique_float_tensors(qm.model).values())


def test_qdir_round_trip_keeps_one_table(tied_qdir):
    from safetensors.numpy import load_file

    qm, qdir = tied_qdir
    stored = load_file(qdir / "layers.safetensors")
    assert "model.embed_tokens.qweight" in stored and not any(k.startswith("lm_head.") for k in stored)
    back = load_quantized(qdir)
    assert back.model.lm_head.qweight is back.model.model.embed_tokens.qweight
    ids = torch.tensor([list(b"embedding tables")])
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, qm.model(ids).logits)


def test_onnx_export_is_exact_with_one_table(tied_qdir, tmp_path, assert_plan_checks_as_written):
    _, qdir = tied_qdir
    out = tmp_path / "emb.onnx"
    meta = export(qdir, "onnx", out, decode=False)
    assert meta["exact"] is True and meta["parity"]["max_abs"] < 1e-3 and meta["parity"]["top1_agree"] == 1.0
    entry = next(e for e in meta["layers"] if e["layer"] == "model.embed_tokens")
    assert entry["op"] == "Gather" and entry["container"] == "int8" and entry["exact"]
    assert all(e["layer"] != "lm_head" for e in meta["layers"])  # rendered with the table it shares
    model = onnx.load(str(out))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 256 * 128]
    assert floats == []  # no float copy of the table or the head
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") >= 3  # integer rows, their zero points and scales
    q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == entry["tensors"]["weight"]))
    assert np.array_equal(q, load_quantized(qdir).model.model.embed_tokens.qweight.numpy())
    ids = np.array([list(b"The embedding is int8.")], dtype=np.int64)
    got = OnnxRunner(out)(ids)[0]
    with torch.no_grad():
        ref = load_quantized(qdir).model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert_plan_checks_as_written(qdir, out, "onnx")  # the integer rows' Gather a copy, the head DequantizeLinear's


@pytest.mark.parametrize("table, op", [
    ({"bits": 4, "granularity": "group", "group_size": 32}, "GatherBlockQuantized"),  # ONNX Runtime's packed blocks
    ({"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32}, "DequantizeLinear"),  # zero points: not packed
])
def test_low_bit_embedding_and_its_tied_head(tmp_path, table, op, assert_plan_checks_as_written):
    """A symmetric 4-bit blocked table is stored once in ONNX Runtime's packed layout: GatherBlockQuantized looks up
    (dequantizing only those rows), the tied head is a MatMulNBits on the same bytes; other low-bit tables go through
    DequantizeLinear of the table. Either way the integers read back bitwise and `edgeq check QDIR` says what the file runs."""
    qm = quantize_model(_tied_tiny_llama(), _recipe(**table))
    qdir = tmp_path / "q4"
    qm.save(qdir)
    out = tmp_path / "e4.onnx"
    meta = export(qdir, "onnx", out)
    entry = next(e for e in meta["layers"] if e["layer"] == "model.embed_tokens")
    assert meta["exact"] is True and entry["op"] == op and entry["blocked"] and entry["exact"]
    assert meta["parity"]["max_abs"] < 1e-3
    assert meta["runtime_min"]["onnxruntime"] == ("1.22" if op == "GatherBlockQuantized" else "1.19")
    for graph in ("prefill", "decode"):
        model = onnx.load(str(out.parent / meta["graph"][graph]))
        tables = [t for t in model.graph.initializer if ("embed_tokens" in t.name or "lm_head" in t.name) and np.prod(t.dims) >= 4096]
        assert len(tables) == 1 and tables[0].name == entry["tensors"]["weight"]  # one copy, integers only
        readers = [n.op_type for n in model.graph.node if tables[0].name in n.input]
        if op == "DequantizeLinear":
            # the table's integers are only dequantized: once for the lookup, once for the head (ONNX Runtime's basic
            # optimizations, which the saved file has had, give each reader its own DequantizeLinear)
            assert readers == ["DequantizeLinear"] * 2
        else:
            assert sorted(readers) == ["GatherBlockQuantized", "MatMulNBits"]  # no DequantizeLinear of the whole table
            head = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
            assert head.input[1] == tables[0].name and {a.name: a.i for a in head.attribute}["accuracy_level"] == 0
            # only the attributes edgeq wrote, none ONNX Runtime 1.32 adds when it saves (1.22 refuses those; measured)
            lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
            assert {a.name for a in lookup.attribute} == {"gather_axis", "quantize_axis", "block_size"}
            assert {a.name for a in head.attribute} == {"K", "N", "bits", "block_size", "accuracy_level"}
    assert_plan_checks_as_written(qdir, out, "onnx")
    if op == "DequantizeLinear":
        # the tied head reads the table through DequantizeLinear + Transpose, which ONNX Runtime does not fuse into
        # MatMulNBits: the whole table is dequantized on every run, and `edgeq check` (file and plan) says so
        import onnxruntime as ort

        from edgeq.targets import check

        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        fused = [n for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type == "MatMulNBits"]
        assert fused and not [n for n in fused if "lm_head" in n.name or "embed_tokens" in n.input[1]]
        for source in (out, qdir):  # the table's two readers, its lookup and the head: both fallbacks (uint4: the table)
            table = [(r.op, r.verdict.support) for r in check(source, "rpi5", runtime="onnxruntime-cpu").rows
                     if "w=uint4" in r.signature]
            assert len(table) == 2 and ("Gather", "fallback") in table and {s for _, s in table} == {"fallback"}, (source, table)


def test_embedding_spec_is_validated():
    with pytest.raises(EdgeqError, match=r"embedding\.bits"):
        _recipe(bits=1)
    with pytest.raises(EdgeqError, match=r"embedding: unknown key 'mode'"):
        _recipe(bits=8, mode="dynamic")
    assert "embedding" not in QuantRecipe.from_dict({"rules": RULES}).to_dict()


def test_tied_heads_input_grid(tmp_path):
    """`[embedding] head_activation` is the input grid of the tied head (a linear layer: in a hybrid TFLite file its
    input is quantized at run time like every other's): dynamic or none, kept in the recipe and the QDIR. With
    LiteRT's run-time grid there and in the rules, a hybrid file's activations are the recipe's."""
    import dataclasses

    import torch.nn.functional as F

    from edgeq.export.tflite_grids import RUNTIME_GRID, hybrid_activations, off_runtime_grid
    from edgeq.quantize.primitives import dynamic_fake_quant_act
    from edgeq.recipe import ActSpec

    rules = [RULES[0], {**RULES[1], "activation": RUNTIME_GRID}]
    recipe = QuantRecipe.from_dict({"name": "w4-emb-grid", "fold_norms": False, "rules": rules,
                                    "embedding": {"bits": 8, "head_activation": RUNTIME_GRID}})
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe and recipe.head_activation == ActSpec(**RUNTIME_GRID)
    with pytest.raises(EdgeqError, match=r"embedding\.head_activation: .*dynamic or none"):
        _recipe(bits=8, head_activation={"mode": "static"})
    qm = quantize_model(_tied_tiny_llama(), recipe)
    qm.save(tmp_path / "q")
    head = load_quantized(tmp_path / "q").model.lm_head
    assert head.decision.method == "tied" and head.decision.activation == recipe.head_activation
    x = torch.randn(2, 5, 128) * torch.linspace(0.1, 8, 128)
    with torch.no_grad():
        assert torch.equal(head(x), F.linear(dynamic_fake_quant_act(x, 8, per_token=True), head.weight_2d()))
    assert off_runtime_grid(qm.layers()) == [] and hybrid_activations(qm.layers())["as_recipe"] is True
    float_head = quantize_model(_tied_tiny_llama(), dataclasses.replace(recipe, head_activation=ActSpec()))
    assert off_runtime_grid(float_head.layers()) == ["lm_head"]
    assert "the input of 1 linear layer to" in hybrid_activations(float_head.layers())["activations"]


@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_tied_head_computes_on_its_input_grid(tmp_path, bits):
    """The tied head's `head_activation` grid is rendered before it in ONNX as for any other layer (it was left out:
    0.018 from the simulation where the other layers' grids agree to 1e-6)."""
    from edgeq.export.tflite_grids import RUNTIME_GRID

    rules = [RULES[0], {**RULES[1], "activation": RUNTIME_GRID}]
    table = {"bits": 8} if bits == 8 else {"bits": 4, "granularity": "group", "group_size": 32, "scale_dtype": "bf16"}
    recipe = QuantRecipe.from_dict({"name": "w4-emb-grid", "fold_norms": False, "rules": rules,
                                    "embedding": {**table, "head_activation": RUNTIME_GRID}})
    qm = quantize_model(_tied_tiny_llama(), recipe)
    qm.save(tmp_path / "q")
    out = tmp_path / "grid.onnx"
    export(tmp_path / "q", "onnx", out, decode=False)
    ids = np.array([list(b"The embedding table and its tied head. And more text follows here")], dtype=np.int64)
    with torch.no_grad():
        ref = load_quantized(tmp_path / "q").model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(OnnxRunner(out)(ids)[0], ref, atol=1e-4)


def test_tflite_renders_the_embedding_and_its_tied_head_as_one_table(tied_qdir, tmp_path, assert_plan_checks_as_written):
    """EMBEDDING_LOOKUP and the tied head's FULLY_CONNECTED read one int8 table with edgeq's integers
    and row scales (read back bitwise); full-integer TFLite refuses, naming what works."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from edgeq.export.tflite_flatbuffer import op_names, read_model, schema

    _, qdir = tied_qdir
    out = tmp_path / "emb.tflite"
    meta = export(qdir, "tflite", out)
    per = meta["readback"]["per_layer"]
    assert meta["variant"] == "int4" and meta["exact"] is True and meta["parity"]["within_tolerance"]
    assert per["model.embed_tokens"]["tflite_type"] == "INT8" and per["lm_head"]["ints"] and per["lm_head"]["scales"]
    model_t = read_model(out.read_bytes())
    sg = model_t.subgraphs[0]
    codes = op_names(model_t)
    table = {op.inputs[1] for op in sg.operators if codes[op.opcodeIndex] in ("EMBEDDING_LOOKUP", "FULLY_CONNECTED")
             and list(sg.tensors[op.inputs[1]].shape) == [256, 128]}
    assert len(table) == 1 and sg.tensors[table.pop()].type == schema().TensorType.INT8  # one table, int8
    assert_plan_checks_as_written(qdir, out, "tflite")
    with pytest.raises(EdgeqError, match="full-integer"):
        export(qdir, "tflite", tmp_path / "full.tflite", variant="int8")
    assert not (tmp_path / "full.tflite").exists()


@pytest.mark.parametrize("spec", [{}, {"granularity": "group", "group_size": 64, "scale_dtype": "bf16"}], ids=["row", "block64"])
def test_tflite_int4_embedding_table(tmp_path, spec, assert_plan_checks_as_written):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    qm = quantize_model(_tied_tiny_llama(), _recipe(bits=4, **spec))
    qm.save(tmp_path / "q4")
    meta = export(tmp_path / "q4", "tflite", tmp_path / "e4.tflite")
    per = meta["readback"]["per_layer"]
    assert meta["exact"] is True and meta["parity"]["within_tolerance"]
    assert per["model.embed_tokens"]["tflite_type"] == per["lm_head"]["tflite_type"] == "INT4"
    assert per["lm_head"].get("block_size") == spec.get("group_size")
    assert_plan_checks_as_written(tmp_path / "q4", tmp_path / "e4.tflite", "tflite")


def test_saved_graph_is_ort_optimized_with_one_tied_table(tiny_llama_ref, tmp_path):
    """ONNX exports save ONNX Runtime's basic graph optimizations (fewer nodes, plain ONNX operators, the outputs bitwise
    the graph as rendered), and no tensor folded from the model's own."""
    qm = quantize_model(_tied_tiny_llama(), QuantRecipe.from_dict({"name": "w4-head-float", "fold_norms": False, "rules": RULES}))
    qdir = tmp_path / "q"
    qm.save(qdir)
    files = {}
    for optimize in (True, False):
        out = tmp_path / f"{'optimized' if optimize else 'raw'}.onnx"
        meta = export(qdir, "onnx", out, optimize=optimize)
        assert meta["exact"] is True
        files[optimize] = (out, meta)
    (opt, opt_meta), (raw, raw_meta) = files[True], files[False]
    assert opt_meta["graph_optimization"]["level"] == "basic" and raw_meta["graph_optimization"] is None
    ids = np.array([list(b"Graph optimization")], dtype=np.int64)
    for graph in ("prefill", "decode"):
        o, r = (onnx.load(str(p.parent / m["graph"][graph])) for p, m in ((opt, opt_meta), (raw, raw_meta)))
        assert len(o.graph.node) < len(r.graph.node)
        assert {n.domain for n in o.graph.node} <= {"", "ai.onnx"}
        tables = [[t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == [128, 256]]
                  for m in (o, r)]
        assert tables[0] == tables[1] and "model.model.embed_tokens.weight" in tables[0]
        large = [{t.name for t in m.graph.initializer if len(t.raw_data) > 1024} for m in (o, r)]
        assert large[0] <= large[1]  # no tensor made by folding (ORT names a folded transpose const_transpose_optimizer)
    prefill = [OnnxRunner(p)(ids) for p in (opt, raw)]
    assert all(np.array_equal(a, b) for a, b in zip(*prefill))
    decode = [OnnxRunner(p).decode_runner()(ids[:, -1:], *out[1:]) for p, out in zip((opt, raw), prefill)]
    assert all(np.array_equal(a, b) for a, b in zip(*decode))


@pytest.mark.parametrize("external", [False, True])
def test_offline_optimization_keeps_a_tied_table_single(tmp_path, external):
    """A float head tied to the embedding reads it through Transpose(table): the saved optimization must not fold that
    into a second table (ORT's constant folding and transpose optimizer would), with the tensors inline or external."""
    from onnx import TensorProto, helper

    from edgeq.export.onnx_files import optimize_offline, save

    table = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
         helper.make_node("Identity", ["h"], ["h2"]), helper.make_node("MatMul", ["h2", "table_t"], ["logits"])],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 64])], [numpy_helper.from_array(table, "table")])
    path = tmp_path / "tied.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path, external)
    ids = np.array([[1, 5, 63]], dtype=np.int64)
    before = OnnxRunner(path)(ids)[0]
    optimize_offline(path, external, {})
    model = onnx.load(str(path))
    assert [t.name for t in model.graph.initializer if t.dims and np.prod(t.dims) > 64] == ["table"]
    assert "Identity" not in [n.op_type for n in model.graph.node]  # the basic optimizations did run
    assert np.array_equal(OnnxRunner(path)(ids)[0], before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tied.onnx"] + (["tied.onnx.data"] if external else [])
