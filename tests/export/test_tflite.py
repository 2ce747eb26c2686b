"""TFLite export: every variant on tiny-llama and a small CNN, read back bitwise and run in LiteRT.

Conversions are slow (litert-torch), so each model architecture is converted once per session
(the exporter's graph cache does the rest) and every test reads the same exported files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.export import export  # noqa: E402
from edgeq.models import load_model  # noqa: E402
from edgeq.models.hf import returned_cache  # noqa: E402
from edgeq.models.inputs import calibration_batches  # noqa: E402
from edgeq.quantize.ptq import quantize_model  # noqa: E402
from edgeq.quantize.qmodel import load_quantized  # noqa: E402
from edgeq.recipe import QuantRecipe, load_recipe  # noqa: E402

CNN = "tests.export.tflite_cnn:small_cnn"

pytestmark = pytest.mark.slow


def _qdir(root: Path, model: str, recipe, name: str, fold_batchnorms: bool = True) -> Path:
    """`fold_batchnorms=False`: a directory whose BatchNorms the export folds (see test_batchnorm_fold.py)."""
    bundle = load_model(model)
    recipe = recipe if isinstance(recipe, QuantRecipe) else load_recipe(recipe)
    recipe = dataclasses.replace(recipe, fold_batchnorms=fold_batchnorms)
    calib = None
    if recipe.needs_calibration:
        calib = calibration_batches(bundle, None, 8, 128 if bundle.is_lm else 0)
    return quantize_model(bundle, recipe, calib).save(root / name)


def _custom(rules: list[dict], name: str = "custom") -> QuantRecipe:
    return QuantRecipe.from_dict({"name": name, "rules": rules})


CNN_MIXED = _custom([
    {"match": "head$", "weight": {"bits": 4, "granularity": "channel", "scale_dtype": "bf16"}, "activation": {"mode": "dynamic"}},
    {"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "dynamic"}},
], "cnn-mixed")
# w4-g128-litert's weights (RTN) with float activations: not the grid LiteRT's hybrid kernels run
INT4_FLOAT_ACTS = _custom([
    {"match": "lm_head$", "skip": True},
    {"match": ".*", "weight": {"bits": 4, "granularity": "group", "group_size": 128, "scale_dtype": "bf16"}},
], "w4-g128-float-acts")

# (model, recipe, variant passed to export: None = the recipe's default)
CASES = {
    "llama-fp32": ("tiny-llama", "w8", "fp32"),
    "llama-dynamic-int8": ("tiny-llama", "w8", None),
    "llama-int8": ("tiny-llama", "w8a8-static", None),
    "llama-int16x8": ("tiny-llama", "w8a16-static", None),
    "llama-int8-fc2a16": ("tiny-llama", "w8a8-static-fc2a16", None),  # int8 with 16x8 down-projections
    "llama-int4": ("tiny-llama", "w4-g128-litert", None),
    "llama-int4-float-acts": ("tiny-llama", INT4_FLOAT_ACTS, None),
    "cnn-fp32": (CNN, None, None),
    "cnn-dynamic-int8": (CNN, "w8", None),
    "cnn-int8": (CNN, "w8a8", None),
    "cnn-int16x8": (CNN, "w8a16-static", None),
    "cnn-int4": (CNN, CNN_MIXED, None),
}
EXPECTED_VARIANT = {k: k.split("-", 1)[1] for k in CASES} | {"llama-int8-fc2a16": "int8", "llama-int4-float-acts": "int4"}


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, tuple[Path, dict, Path | None]]:
    """case -> (file, metadata, qdir) for every case, exported once."""
    root = tmp_path_factory.mktemp("tflite")
    qdirs: dict = {}
    out = {}
    for case, (model, recipe, variant) in CASES.items():
        qdir = None
        if recipe is not None:
            key = (model, recipe if isinstance(recipe, str) else recipe.name)
            if key not in qdirs:
                qdirs[key] = _qdir(root, model, recipe, f"q-{len(qdirs)}")
            qdir = qdirs[key]
        path = root / f"{case}.tflite"
        meta = export(qdir or model, "tflite", path, variant=variant)
        out[case] = (path, meta, qdir)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_variant_metadata_and_parity(exported, case):
    path, meta, qdir = exported[case]
    assert meta["variant"] == EXPECTED_VARIANT[case]
    on_disk = json.loads(Path(str(path) + ".json").read_text())
    assert on_disk["sha256"] == meta["sha256"] and on_disk["size_bytes"] == path.stat().st_size
    for key in ("format", "source", "recipe", "exact", "parity", "inputs", "runtime_min"):
        assert key in on_disk, key
    assert on_disk["format"] == "tflite"
    if qdir is not None and meta["variant"] != "fp32":  # quant.json said at quantize time this variant holds the grids
        said = json.loads((qdir / "quant.json").read_text())["tflite"]
        assert said["variants"][meta["variant"]]["representable"] is True
        if meta["variant"] in ("dynamic-int8", "int4"):  # and whether the run-time activation grid is the recipe's
            assert said["variants"][meta["variant"]]["as_recipe"] == on_disk["activations"]["as_recipe"]
            assert on_disk["activations"]["as_recipe"] == ("runtime_grid" not in on_disk["parity"])
        else:
            assert "as_recipe" not in said["variants"][meta["variant"]] and on_disk["activations"] is None
        assert said["default_variant"] == meta["variant"] or CASES[case][2] is not None
        assert (said["note"] is not None) == bool(meta.get("bn_folded"))  # folded BatchNorms: scales not edgeq's
    parity = meta["parity"]
    assert parity["within_tolerance"], parity
    assert parity["cos_min"] >= parity["tolerance"]["cos_min"]
    if meta["variant"] == "fp32":
        assert parity["max_abs"] < 1e-2 and parity["cos_min"] > 0.99999  # float reassociation only
    else:
        assert meta["exact"] is True, meta["readback"]["mismatches"]
        assert meta["readback"]["layers"] == len(load_quantized(qdir).layers())


def test_hybrid_files_against_the_run_time_activation_grid(exported):
    """LiteRT's hybrid kernels quantize each linear layer's input per row to asymmetric int8 at run time. The -litert
    recipes simulate that grid, so their INT4 file is within float noise of the simulation (tiny-llama: max_abs a few
    thousandths, where the same weights simulated with float activations were 0.17 away). A recipe on another grid (float
    activations; `w8`'s symmetric per-token grid) gets `parity.runtime_grid`: the file is closer to the simulation
    with the run-time grid than to its recipe's. Files without hybrid kernels carry no such check."""
    int4, floats, dyn = (exported[c][1]["parity"] for c in ("llama-int4", "llama-int4-float-acts", "llama-dynamic-int8"))
    assert "runtime_grid" not in int4 and int4["max_abs"] < 0.03 and int4["top1_agree"] == 1.0, int4
    assert exported["llama-int4"][1]["activations"]["as_recipe"] is True
    runtime = floats["runtime_grid"]
    assert runtime["max_abs"] < floats["max_abs"] / 5 and runtime["cos_min"] > floats["cos_min"], (runtime, floats)
    assert runtime["top1_agree"] >= floats["top1_agree"]
    assert set(runtime["noise_floor"]) == {"cos_min", "top1_agree", "nll_spread", "draws", "per_draw"}
    assert abs(runtime["nll_simulation"] - floats["nll"]["file"]) < abs(floats["nll"]["simulation"] - floats["nll"]["file"]) + 1e-4
    assert dyn["runtime_grid"]["max_abs"] < dyn["max_abs"], (dyn["runtime_grid"], dyn)
    for case in ("llama-int8", "llama-int16x8", "llama-fp32", "cnn-int8"):
        assert "runtime_grid" not in exported[case][1]["parity"], case


def test_hybrid_convolutions_against_xnnpacks_run_time_grid(exported):
    """XNNPACK quantizes a 1x1 convolution's input per pixel (it runs the layer as a fully-connected one) and a larger
    convolution's per image, in its own float arithmetic (`xnnpack_qd8`). The small CNN's dynamic-int8 file (`w8`:
    symmetric grids per tensor for its convolutions) is within float precision of the simulation on those grids. Before
    2026-12-06 that simulation put only linear layers on the run-time grid, and the file was 6.5e-4 from it (outside
    its noise floor); with per-pixel and per-image grids in ONNX Runtime's arithmetic (x / scale), 2.2e-4: 63% of the
    stem's photo inputs sit on a rounding tie."""
    from edgeq.export.tflite_grids import CONV_RUNTIME_GRID, RUNTIME_GRID, off_runtime_grid, runtime_input_dims
    from edgeq.quantize.modules import activations_as
    from edgeq.recipe import ActSpec

    _, meta, qdir = exported["cnn-dynamic-int8"]
    layers = load_quantized(qdir).layers()
    assert {n: runtime_input_dims(m) for n, m in layers.items()} == {"stem": (1, 2, 3), "pw": (1,), "head": (-1,)}
    assert off_runtime_grid(layers) == ["head", "pw", "stem"]
    with activations_as(layers, ActSpec(**CONV_RUNTIME_GRID), kind="conv2d"), \
            activations_as(layers, ActSpec(**RUNTIME_GRID), kind="linear"):
        assert off_runtime_grid(layers) == ["pw"]  # no recipe grid is per pixel
    assert "and 2 convolutions to asymmetric int8" in meta["activations"]["activations"], meta["activations"]
    runtime = meta["parity"]["runtime_grid"]
    assert runtime["max_abs"] < 1e-5 and runtime["within_noise_floor"] is True, runtime
    assert "per pixel of a 1x1 convolution's" in runtime["grid"]


def test_full_integer_files_against_their_output_grids(exported):
    """A full-integer file requantizes each layer's output to the int8 grid (int16 in 16x8 layers) the export
    calibrated, a rounding quant.json's simulation does not have. `parity.with_output_grids` is the file against the
    simulation with those grids, read back from the file: within that simulation's noise floor and much nearer than
    to the plain simulation, so a file that misses its tolerance by design is told apart from a wrong one (the int8
    CNN's logits are bitwise those of the simulation with grids). Files without output grids carry no such check."""
    for case in ("llama-int8", "llama-int16x8", "cnn-int8", "cnn-int16x8"):
        beside = exported[case][1]["parity"]["with_output_grids"]
        assert beside["within_noise_floor"] is True, (case, beside)
    assert exported["cnn-int8"][1]["parity"]["with_output_grids"]["max_abs"] == 0.0
    # a CNN gives one row per image, so parity runs 32 of them (one flipped top-1 is 0.97 agreement, not 0.75)
    assert exported["cnn-int8"][1]["parity"]["rows"] == exported["cnn-int8"][1]["parity"]["samples"] == 32
    # the fc2a16 file flips one near-tie of 256 rows, as the 13th noise draw does
    for case in ("llama-int8", "llama-int8-fc2a16"):
        parity = exported[case][1]["parity"]
        beside, nll = parity["with_output_grids"], parity["nll"]
        assert beside["max_abs"] < parity["max_abs"] / 1.5 and beside["cos_min"] > parity["cos_min"], (case, beside, parity)
        assert abs(beside["nll_simulation"] - nll["file"]) < abs(nll["simulation"] - nll["file"]), (case, beside, nll)
    for case in ("llama-fp32", "llama-dynamic-int8", "llama-int4", "cnn-dynamic-int8", "cnn-fp32"):
        assert "with_output_grids" not in exported[case][1]["parity"], case


def test_eval_reads_a_tflite_lm_at_its_own_length(exported, capsys):
    """`edgeq eval FILE.tflite` on a decoder LM: perplexity windows are the file's fixed length by default and come out
    near the simulation's on the same windows; another --seq-len is refused in one line naming the file's."""
    from edgeq.cli.main import main

    path, meta, qdir = exported["llama-int8"]
    seq = meta["seq_len"]
    assert main(["eval", str(path), "--count", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["label"] == "tflite" and got["seq_len"] == seq and got["metrics"]["tokens"] == 4 * (seq - 1)
    assert main(["eval", str(qdir), "--count", "4", "--seq-len", str(seq), "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert abs(got["metrics"]["ppl"] / sim["metrics"]["ppl"] - 1) < 0.02, (got["metrics"], sim["metrics"])
    assert main(["eval", str(path), "--count", "4", "--seq-len", str(seq * 2)]) == 2
    assert f"pass --seq-len {seq}" in capsys.readouterr().err


def test_auto_plan_for_litert_exports_exactly(tmp_path, capsys):
    """`edgeq quantize --recipe auto --target rpi5 --runtime litert-xnnpack --method gptq`: a mixed INT4 / INT8 plan
    whose grids the TFLite file holds bitwise, natively on the board's LiteRT; a plan for ONNX Runtime is refused with
    the way to it."""
    from edgeq.cli.main import main

    qdir, onnx_qdir, out = tmp_path / "q", tmp_path / "q-ort", tmp_path / "auto.tflite"
    common = ["--recipe", "auto", "--target", "rpi5", "--budget", "6bits", "--samples", "2", "--seq-len", "64"]
    assert main(["quantize", "tiny-llama", *common, "--runtime", "litert-xnnpack", "--method", "gptq", "-o", str(qdir)]) == 0
    assert main(["export", str(qdir), "--format", "tflite", "-o", str(out), "--target", "rpi5", "--json"]) == 0
    capsys.readouterr()
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["exact"] is True and meta["variant"] == "int4" and meta["parity"]["cos_min"] > 0.999
    layers = json.loads((qdir / "quant.json").read_text())["layers"]
    assert {e["weight"]["bits"] for e in layers} == {4, 8} and {e["method"] for e in layers} == {"gptq"}
    assert main(["quantize", "tiny-llama", *common, "--activation", "dynamic", "-o", str(onnx_qdir)]) == 0
    assert main(["export", str(onnx_qdir), "--format", "tflite", "-o", str(tmp_path / "x.tflite")]) == 2
    assert "quantize with --recipe auto --runtime litert-xnnpack" in capsys.readouterr().err


def test_graph_cache_key_follows_the_config_and_code(tiny_mistral, tmp_path, monkeypatch):
    """Converted float graphs are cached by what they depend on. A model saved again at its path with another sliding
    window (the same weights) got the old graph: a Mistral's INT4 file computed full attention against a simulation
    with a window of 16 (cosine 0.80). The key now holds the config and the source the graph is traced from."""
    import shutil

    import transformers

    from edgeq.export import tflite_graph

    path = tmp_path / "mistral"
    shutil.copytree(tiny_mistral, path)

    def key() -> str:
        bundle = load_model(str(path))
        return tflite_graph.graph_key(bundle, bundle.module, 16)

    before = key()
    assert key() == before  # a cache that never hits is no cache
    config = transformers.AutoConfig.from_pretrained(path)
    config.sliding_window = 4
    config.save_pretrained(path)
    after = key()
    assert after != before
    monkeypatch.setattr(tflite_graph, "GRAPH_SOURCES", tflite_graph.GRAPH_SOURCES + ("export/tflite.py",))
    assert key() != after  # another source file in the rendering


def test_quantized_files_are_smaller_than_fp32(exported):
    fp32 = exported["llama-fp32"][0].stat().st_size
    assert exported["llama-dynamic-int8"][0].stat().st_size < 0.5 * fp32
    assert exported["llama-int4"][0].stat().st_size < exported["llama-dynamic-int8"][0].stat().st_size


def _interpreter_weights(path: Path) -> dict[str, dict]:
    """Weight tensors and their quantization as LiteRT's own interpreter reports them (an independent reader)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    out = {}
    for d in it.get_tensor_details():
        if d["name"].startswith("edgeq/") and d["name"].endswith("/weight"):
            out[d["name"][6:-7]] = {"dtype": d["dtype"], "q": d["quantization_parameters"],
                                    "data": it.get_tensor(d["index"]) if d["dtype"] == np.int8 else None}
    return out


@pytest.mark.parametrize("case", ["llama-dynamic-int8", "llama-int8", "llama-int16x8", "llama-int8-fc2a16", "cnn-int8"])
def test_int8_weights_read_back_bitwise_by_litert(exported, case):
    path, _, qdir = exported[case]
    qm = load_quantized(qdir)
    seen = _interpreter_weights(path)
    assert set(seen) == set(qm.layers())
    for name, m in qm.layers().items():
        got = seen[name]
        assert got["dtype"] == np.int8
        scales = np.asarray(got["q"]["scales"], dtype=np.float32)
        assert np.array_equal(scales.view(np.uint32), m.scale[:, 0].numpy().view(np.uint32)), name
        assert not np.any(got["q"]["zero_points"])
        q = got["data"]
        want = m.qweight.numpy().astype(np.int8)
        if q.ndim == 4:  # conv OHWI / depthwise 1HWO back to edgeq's [out, in*kh*kw]
            q = q.transpose(0, 3, 1, 2) if m.conv_args["groups"] == 1 else q.transpose(3, 0, 1, 2)
            q = q.reshape(q.shape[0], -1)
        assert np.array_equal(q, want), name
        assert q.min() >= -127  # narrow range


def _layer_io(path: Path) -> dict[str, tuple[dict, dict]]:
    """Each edgeq layer's (input, output) tensor details as LiteRT's own interpreter reports them."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    details = {d["index"]: d for d in it.get_tensor_details()}
    ops = [op for op in it._get_ops_details() if op["outputs"]]
    return {details[op["outputs"][0]]["name"]: (details[op["inputs"][0]], details[op["outputs"][0]]) for op in ops}


def _assert_static_input_grid(x: dict, m) -> None:
    scale = np.asarray(x["quantization_parameters"]["scales"], dtype=np.float32)
    assert scale.shape == (1,) and scale.view(np.uint32)[0] == np.float32(m.act_scale.item()).view(np.uint32)
    zero = 0 if m.decision.activation.bits == 16 else int(m.act_zero_point.item()) - 128
    assert np.all(np.asarray(x["quantization_parameters"]["zero_points"]) == zero)


def test_int16x8_input_grids_read_back_by_litert(exported):
    """In the 16x8 file every layer reads an int16 input on edgeq's static grid (scale bitwise, zero point 0), as
    LiteRT's own interpreter reports it, and its outputs are int16 too: nothing in the layer runs in float."""
    from edgeq.export.tflite_graph import label

    path, meta, qdir = exported["llama-int16x8"]
    io = _layer_io(path)
    for name, m in load_quantized(qdir).layers().items():
        x, y = io[label(name)]
        assert x["dtype"] == np.int16 and y["dtype"] == np.int16, name
        _assert_static_input_grid(x, m)
    assert meta["conventions"]["int16_activations"].startswith("static (16x8)")
    assert meta["runtime_min"]["tflite-runtime"] == "not tested"


def test_int8_file_holds_the_recipes_16x8_layers(exported):
    """w8a8-static-fc2a16: the down-projections read and write int16 (16x8), every other layer int8, each input on
    edgeq's grid; the metadata names the 16x8 layers and the runtime they need."""
    from edgeq.export.tflite_graph import label

    path, meta, qdir = exported["llama-int8-fc2a16"]
    layers = load_quantized(qdir).layers()
    io = _layer_io(path)
    wide = sorted(n for n in layers if n.endswith("down_proj"))
    assert len(wide) == 4 and meta["int16x8_layers"]["layers"] == wide
    for name, m in layers.items():
        x, y = io[label(name)]
        want = np.int16 if name in wide else np.int8
        assert x["dtype"] == want and y["dtype"] == want, name
        _assert_static_input_grid(x, m)
    # tflite-runtime was not tested with 16x8 files: no claim either way (None would rule it out on a board)
    assert meta["runtime_min"]["tflite-runtime"] == "not tested" and "16x8" in meta["runtime_min"]["note"]
    assert "int16 in its 16x8 layers" in meta["output_grids"]["note"] and meta["output_grids"]["layers"] == len(layers)


def test_int4_blockwise_read_back(exported):
    from edgeq.export.tflite_check import read_back

    path, meta, qdir = exported["llama-int4"]
    qm = load_quantized(qdir)
    report = read_back(path.read_bytes(), qm.layers())
    assert report["exact"], report["mismatches"]
    layer = next(iter(report["layers"].values()))
    assert layer["tflite_type"] == "INT4" and layer["block_size"] == 128
    # a corrupted copy must be caught: flip one weight nibble of the first layer, in place in the file
    from edgeq.export.tflite_flatbuffer import read_model

    raw = bytearray(path.read_bytes())
    model_t = read_model(bytes(raw))
    name = next(iter(qm.layers()))
    tensor = next(t for sg in model_t.subgraphs for t in sg.tensors if t.name == f"edgeq/{name}/weight".encode())
    buffer = model_t.buffers[tensor.buffer]
    assert buffer.data is None and buffer.offset > 0  # ai-edge-quantizer stores constants past the flatbuffer
    raw[buffer.offset] ^= 0x01
    bad = read_back(bytes(raw), qm.layers())
    assert not bad["exact"] and any(m.startswith(f"{name}: ints") for m in bad["mismatches"])


def test_fused_siblings_keep_every_bit(exported, tmp_path):
    """`fuse=True` (CLI --fuse): a layer's query/key/value and gate/up projections read one input and become one
    FULLY_CONNECTED cut by SLICEs, in both signatures: the outputs bitwise the unfused file's, each layer read back
    exactly from its rows of the fused weight (a flipped nibble there is caught, on that layer alone)."""
    from ai_edge_quantizer import quantizer, recipe

    from edgeq.export.tflite_check import read_back
    from edgeq.export.tflite_decode import run_steps, zero_caches
    from edgeq.export.tflite_fuse import fuse_siblings, fused_names
    from edgeq.export.tflite_flatbuffer import op_names, read_model
    from edgeq.export.tflite_graph import float_graph, labelled
    from edgeq.export.tflite_runtime import TfliteRunner

    bundle = load_model("tiny-llama")
    n_layers = bundle.module.config.num_hidden_layers
    path, meta, qdir = exported["llama-int4"]
    assert meta["graph"]["fused"] is None  # not by default
    fmeta = export(qdir, "tflite", tmp_path / "fused.tflite", fuse=True)
    fused = fmeta["graph"]["fused"]
    assert fmeta["exact"] is True and set(fused) == {"serving_default", "decode"}
    groups = fused["decode"]["layers"]
    assert fused["decode"]["groups"] == len(groups) == 2 * n_layers
    assert [name.rsplit(".", 1)[1] for name in groups[0] + groups[1]] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    qm = load_quantized(qdir)
    rows = {n: int(m.decision.shape[0]) for n, m in qm.layers().items()}
    q, k, v = groups[0]
    assert fmeta["readback"]["per_layer"][v]["fused_rows"] == [rows[q] + rows[k], rows[q] + rows[k] + rows[v]]

    raw = bytearray((tmp_path / "fused.tflite").read_bytes())
    model_t = read_model(bytes(raw))
    tensor = next(t for t in model_t.subgraphs[0].tensors if fused_names(t.name) and labelled(fused_names(t.name)[-1])[0] == v)
    offset = bytes(raw).find(bytes(model_t.buffers[tensor.buffer].data))  # a fused weight is written in the flatbuffer
    raw[offset + (rows[q] + rows[k]) * int(tensor.shape[1]) // 2] ^= 0x01  # v's first byte (int4: two per byte)
    bad = read_back(bytes(raw), qm.layers())
    assert [m.split(" (")[0] for m in bad["mismatches"] if ": ints" in m] == [f"{v}: ints differ"]

    unfused, _, _, _ = float_graph(bundle, bundle.module.eval(), 64, cache_len=32)
    qt = quantizer.Quantizer(unfused)
    qt.load_quantization_recipe(recipe.dynamic_wi4b32_afp32())
    aeq_int4 = bytes(qt.quantize(None, enable_progress_report=False).quantized_model)
    pairs = [(before, fuse_siblings(before)[0]) for before in (unfused, aeq_int4)]  # fp32, ai-edge-quantizer's INT4
    pairs.append((path.read_bytes(), (tmp_path / "fused.tflite").read_bytes()))
    ids = np.arange(3, 67, dtype=np.int64)[None]

    def fcs(buf):
        m = read_model(buf)
        return [op_names(m)[op.opcodeIndex] for op in m.subgraphs[1].operators].count("FULLY_CONNECTED")

    for before, after in pairs:
        assert fcs(after) == fcs(before) - 3 * n_layers
        assert len(after) <= len(before) + 4096  # the same weights once, plus the slices' constants
        names = [t.name for sg in read_model(after).subgraphs for t in sg.tensors]
        assert len(names) == len(set(names))  # unique in the file, as ai-edge-quantizer requires
        outs = []
        for buf in (before, after):
            step = TfliteRunner(buf, signature="decode")
            steps, _ = run_steps(step, ids[:, :8], zero_caches(step))
            outs.append([*TfliteRunner(buf)(ids), steps])
        assert all(np.array_equal(a, b) for a, b in zip(*outs))

    int8_qdir = exported["llama-int8"][2]
    with pytest.raises(EdgeqError, match="fuse applies to fp32, dynamic-int8 and int4 files, not int8"):
        export(int8_qdir, "tflite", tmp_path / "int8.tflite", fuse=True)
    assert not (tmp_path / "int8.tflite").exists()


def test_int8_activation_grids_are_edgeqs(exported):
    _, meta, qdir = exported["llama-int8"]
    assert all(entry["act"] for entry in meta["readback"]["per_layer"].values())
    assert "output_grids" in meta


def test_output_grids_hold_every_calibration_inputs_range(tmp_path):
    """A full-integer layer's output grid spans the lowest and highest output of all its calibration inputs by
    default. ai-edge-quantizer's own calibrate() averages the inputs' ranges (0.95 old, 0.05 new), which leaves the
    second, wider input's outputs mostly outside; `moving-average` gives its ranges."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer

    from edgeq.export.tflite_flatbuffer import op_names, read_model
    from edgeq.export.tflite_quant import ALGORITHM, calibrate

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).eval()
    small = torch.randn(1, 16)
    path = tmp_path / "fc.tflite"
    litert_torch.convert(layer, (small,)).export(str(path))
    buf = path.read_bytes()
    entries = [{"regex": ".*", "operation": "FULLY_CONNECTED", "algorithm_key": ALGORITHM,
                "op_config": {"weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
                              "activation_tensor_config": {"num_bits": 8, "symmetric": False, "granularity": "TENSORWISE", "dtype": "INT"},
                              "compute_precision": "INTEGER", "explicit_dequantize": False}}]
    model_t = read_model(buf)
    sg = model_t.subgraphs[0]
    fc = next(op for op in sg.operators if op_names(model_t)[op.opcodeIndex] == "FULLY_CONNECTED")
    feed, out = (sg.tensors[i].name.decode() for i in (sg.inputs[0], fc.outputs[0]))
    feeds = [small, 4 * torch.randn(1, 16)]
    calibration = {"serving_default": [{name: x.numpy()} for x in feeds]
                   for name in Interpreter(model_content=buf).get_signature_runner().get_input_details()}
    with torch.no_grad():
        outputs = torch.cat([layer(x) for x in feeds])
    first, second = outputs.numpy().astype(np.float64)
    assert second.max() - second.min() > 3 * (first.max() - first.min())  # the second input widens the range
    ours = calibrate(buf, entries, calibration)
    assert feed in ours and np.allclose([ours[out]["min"].item(), ours[out]["max"].item()],
                                        [min(first.min(), second.min()), max(first.max(), second.max())], rtol=1e-5)
    qt = quantizer.Quantizer(bytearray(buf))
    qt.load_quantization_recipe(entries)
    theirs = qt.calibrate(calibration, num_threads=1)[out]
    averaged = calibrate(buf, entries, calibration, "moving-average")  # --output-calibration moving-average
    for end, pick in (("min", np.min), ("max", np.max)):  # the range of the first input, moved 5% towards the second's
        assert np.isclose(theirs[end].item(), 0.95 * pick(first) + 0.05 * pick(second), rtol=1e-5)
        assert averaged[out][end].item() == theirs[end].item()


def test_output_grids_read_back_and_what_they_saturate(exported, tmp_path, capsys, monkeypatch):
    """FILE.json `output_grids`: each layer's grid as LiteRT reads it, and the simulation's outputs on the parity
    inputs it saturates. Calibrated on one input instead of eight, every grid is contained in the eight's (min/max
    over a superset) and saturates at least as much; the CLI names the worst when the file misses its tolerance."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeq.cli.main import main
    from edgeq.export.verdict import TOLERANCE
    from edgeq.export.tflite_check import output_grids

    path, meta, qdir = exported["llama-int8"]
    layers = load_quantized(qdir).layers()
    grids = output_grids(path.read_bytes(), layers)
    assert meta["output_grids"]["layers"] == len(grids) == len(layers) and meta["output_grids"]["calib_samples"] == 8
    details = {d["name"]: d for d in Interpreter(model_path=str(path)).get_tensor_details()}
    for name, (lo, hi, step) in grids.items():
        qp = details[f"edgeq/{name}"]["quantization_parameters"]
        assert step == qp["scales"][0] and lo == (-128 - qp["zero_points"][0]) * step and hi == lo + 255 * step

    monkeypatch.setitem(TOLERANCE, "int8", (1.5, 1.5))  # no file meets it: the CLI warns and adds its note
    one = tmp_path / "one.tflite"
    assert main(["export", str(qdir), "--format", "tflite", "--calib-samples", "1", "-o", str(one), "--json"]) == 0
    err = capsys.readouterr().err
    assert "Running Calibration" not in err  # ai-edge-quantizer's bars follow edgeq's: none where stderr is no terminal
    narrow = json.loads(Path(str(one) + ".json").read_text())["output_grids"]
    assert narrow["calib_samples"] == 1 and narrow["clipped_layers"] > 0, narrow
    for name, (lo, hi, _) in output_grids(one.read_bytes(), layers).items():
        wide = grids[name]
        assert wide[0] <= lo + wide[2] / 2 and wide[1] >= hi - wide[2] / 2, (name, wide, lo, hi)
    for name, entry in narrow["clipped"].items():
        assert entry["seen"][0] < entry["grid"][0] or entry["seen"][1] > entry["grid"][1], (name, entry)
    clipped = meta["output_grids"]["clipped"]
    assert sum(e["values"] for e in narrow["clipped"].values()) >= sum(e["values"] for e in clipped.values())
    worst = next(iter(narrow["clipped"]))
    assert "edgeq: note: the output grids calibrated at export saturate" in err and worst in err and "--calib-samples" in err
    assert "recipe w8a8-static-fc2a16 gives them to the MLP down-projections" in err  # the preset that does it
    # an LM's warning sets the file's NLL beside the simulation's, and the simulation's own noise floor beside both
    assert "mean NLL" in err and "the simulation against itself, its layers' inputs perturbed by 1e-06: cos_min" in err


def test_calib_samples_only_where_outputs_have_grids(exported, tmp_path):
    from edgeq.cli.main import main

    qdir = exported["llama-int4"][2]
    with pytest.raises(EdgeqError, match="calib_samples applies to the full-integer variants"):
        export(qdir, "tflite", tmp_path / "m.tflite", calib_samples=4)
    assert main(["export", str(qdir), "--format", "onnx", "--calib-samples", "4", "-o", str(tmp_path / "m.onnx")]) == 2
    assert not list(tmp_path.iterdir())


def test_runner_matches_simulation_and_checks_shapes(exported):
    from edgeq.export.tflite_runtime import TfliteRunner

    path, meta, qdir = exported["llama-dynamic-int8"]
    runner = TfliteRunner(path, threads=2)
    assert [s["shape"] for s in runner.input_specs()] == [[1, 64]]
    assert meta["inputs"][0]["range"] == [0, 255]
    from edgeq.data import lm_windows
    from edgeq.models.tokenizers import ByteTokenizer

    ids = lm_windows(ByteTokenizer(), "enwiki", "evaluation", 64, 6)[5:6]  # a window the export's parity did not use
    logits = runner(ids)[0]
    assert logits.shape == (1, 64, 256)
    with torch.no_grad():
        ref = load_quantized(qdir).model(torch.from_numpy(ids)).logits.numpy()
    cos = (ref * logits).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(logits, axis=-1))
    # hybrid kernels quantize each row, the simulation the whole tensor: close, not equal
    assert cos.mean() > 0.995 and cos.min() > 0.98
    with pytest.raises(EdgeqError, match="shape"):
        runner(ids[:, :32])


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("llama-")])
def test_decode_signature_matches_simulation_and_prefill(exported, case):
    """Every LM variant carries a KV-cache decode signature (default 256 slots) on the same weight buffers:
    run token by token from an empty cache, or on after the prefill signature ran half the sample, it gives
    the simulation's logits, and (except where LiteRT requantizes outputs to integer grids: full integer) the
    prefill signature's. A full-integer layer's output grid is one grid in both signatures (the union of their
    calibrated ranges): grids of the few calibration steps alone clipped SmolLM2's outliers in the decode step."""
    from edgeq.export.tflite_flatbuffer import read_model
    from edgeq.export.tflite_graph import label

    path, meta, qdir = exported[case]
    decode = meta["graph"]["decode"]
    assert decode["signature"] == "decode" and decode["cache_len"] == 256 and meta["graph"]["decode_note"] is None
    parity = meta["parity"]["decode"]
    assert parity["rows"] == 16 and parity["cos_min"] >= meta["parity"]["tolerance"]["cos_min"], parity
    assert parity["after_prefill"]["cos_min"] >= meta["parity"]["tolerance"]["cos_min"], parity
    # the slot count is a run-time choice in every variant's file: resized, the steps give the declared shape's logits
    assert decode["dynamic_slots"] and parity["resized"]["max_abs_vs_declared"] < 1e-4, parity["resized"]
    if meta["variant"] not in ("int8", "int16x8"):
        # the two signatures compute one function: equal on LiteRT's reference kernels up to float rounding, except
        # where an input quantized at run time (hybrid kernels) sits on a rounding tie, which the rounding moves one
        # step (one position of the 16 in `llama-int4`: 4.2e-4); XNNPACK, on some CPUs (AVX512-VNNI), also takes other
        # dynamic-int8 kernels for one row than for many (0.017 here)
        steps = _decode_vs_prefill(path, xnnpack=False)
        assert np.sum(steps > 1e-4) <= (1 if meta["variant"] in ("dynamic-int8", "int4") else 0) and steps.max() < 1e-2, steps
        assert parity["vs_prefill_max_abs"] < (parity["max_abs"] if meta["variant"] in ("dynamic-int8", "int4") else 1e-4), parity
    # XNNPACK runs each signature as one graph: only the lookups before the first layer (and the prefill's causal mask)
    # are left to LiteRT's built-in kernels, and the 16x8 layers, which XNNPACK has no kernel for. A slice of size -1
    # once cut the step into one partition per layer, and the keys and values repeated for grouped-query attention
    # (BROADCAST_TO) cut the prefill
    wide = meta["readback"]["layers"] if meta["variant"] == "int16x8" else len((meta.get("int16x8_layers") or {}).get("layers", []))
    for signature, lookups in (("decode", {"CAST", "EMBEDDING_LOOKUP", "RESHAPE"}),
                               ("serving_default", {"EMBEDDING_LOOKUP", "RESHAPE", "SELECT_V2"})):
        xnnpack = meta["graph"]["xnnpack"][signature]
        assert xnnpack["builtin"].get("FULLY_CONNECTED", 0) == wide, (signature, xnnpack)
        if not wide:
            assert xnnpack["partitions"] == 1 and set(xnnpack["builtin"]) <= lookups, (signature, xnnpack)
    model_t = read_model(path.read_bytes())
    assert len(model_t.subgraphs) == 2
    tensors = [{t.name.decode(): t.buffer for t in sg.tensors} for sg in model_t.subgraphs]
    grids = [{t.name.decode(): t.quantization for t in sg.tensors} for sg in model_t.subgraphs]
    for name in load_quantized(qdir).layers():
        if label(name, 0, weight=True) in tensors[0]:  # a tied head reads its embedding table's tensor
            assert tensors[0][label(name, 0, weight=True)] == tensors[1][label(name, 1, weight=True)], name  # one copy
        if meta["variant"] in ("int8", "int16x8"):
            prefill, step = grids[0][label(name, 0)], grids[1][label(name, 1)]
            assert list(prefill.scale) == list(step.scale) and list(prefill.zeroPoint) == list(step.zeroPoint), name


def _decode_vs_prefill(path: Path, xnnpack: bool) -> np.ndarray:
    """Per position, the max |logits| difference between 16 decode steps from an empty cache and the prefill signature."""
    from edgeq.data import lm_windows
    from edgeq.export.tflite_decode import run_steps, zero_caches
    from edgeq.export.tflite_runtime import TfliteRunner
    from edgeq.models.tokenizers import ByteTokenizer

    ids = lm_windows(ByteTokenizer(), "enwiki", "evaluation", 64, 1)
    prefill = TfliteRunner(path, xnnpack=xnnpack)(ids)[0]
    step = TfliteRunner(path, signature="decode", xnnpack=xnnpack)
    got, _ = run_steps(step, ids[:, :16], zero_caches(step))
    return np.abs(got - prefill[0, :16]).max(axis=-1)


def test_grouped_attention_is_eager_attention_without_repeats():
    """The attention the TFLite prefill is converted with (query heads stacked per kv head instead of `repeat_kv`) gives
    Hugging Face's eager attention's logits, with a padded batch's mask too, and hands the model back as it was."""
    from edgeq.models.hf import grouped_attention

    model = load_model("tiny-llama").module.eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query, or nothing is tested
    before = model.config._attn_implementation
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask, not causality alone, decides what row 1 attends to
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(input_ids=ids).logits
        with grouped_attention(model):
            assert model.config._attn_implementation == "edgeq_grouped"
            grouped = model(input_ids=ids, attention_mask=mask).logits
        assert model.config._attn_implementation == "eager"
    model.set_attn_implementation(before)
    assert torch.allclose(grouped[0], eager[0], atol=1e-5) and torch.allclose(grouped[1, 5:], eager[1, 5:], atol=1e-5)
    assert not torch.allclose(unmasked[1, 5:], eager[1, 5:], atol=1e-3)  # the mask mattered


def test_decode_signature_generates_like_transformers(tmp_path):
    """A user's greedy loop over the file writes the tokens Hugging Face's generate writes, at a cache
    length of our choosing: the prompt through the prefill signature (padded to its length) or one decode
    step per token, then decode steps on its own picks; and with the caches kept in the interpreter's buffers
    (DecodeSession: each step returns only its token's key and value, written in place)."""
    from edgeq.export.tflite_decode import run_steps
    from edgeq.export.tflite_runtime import DecodeSession, TfliteRunner, attention_mask

    meta = export("tiny-llama", "tflite", tmp_path / "lm.tflite", seq_len=16, cache_len=32)
    assert meta["graph"]["decode"]["cache_len"] == 32
    step = TfliteRunner(tmp_path / "lm.tflite", signature="decode")
    assert [s["shape"] for s in step.input_specs()[2:5]] == [[1, 1, 32], [2, 32, 32], [2, 32, 32]]  # mask, k_0, v_0
    model = load_model("tiny-llama").module.eval()
    prompt = torch.tensor([[84, 104, 101, 32, 99, 105, 116, 121]])  # "The city"
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    n = prompt.shape[1]
    padded = np.zeros((1, 16), dtype=np.int64)
    padded[:, :n] = prompt.numpy()
    prefill = TfliteRunner(tmp_path / "lm.tflite")(padded)
    assert len(prefill) == 1 + len(step.input_specs()) - 3
    with torch.no_grad():  # the prefill's caches are Hugging Face's, keys as they are and values transposed, zero after
        past = returned_cache(model(input_ids=prompt, use_cache=True)).layers[0]
    np.testing.assert_allclose(prefill[1][:, :n], past.keys[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(prefill[2][..., :n], past.values[0].transpose(1, 2).numpy(), atol=1e-4)
    stepped = run_steps(step, prompt.numpy(), [np.zeros(s["shape"], dtype=np.float32) for s in step.input_specs()[3:]])
    for logits, cache in ((prefill[0][0, n - 1:n], prefill[1:]), stepped):
        got = [int(np.argmax(logits[-1]))]
        for pos in range(n, n + 11):
            logits, cache = run_steps(step, np.array([got[-1:]]), cache, start=pos)
            got.append(int(np.argmax(logits[-1])))
        assert got == want
    mask = attention_mask(0, 32)
    assert [o.shape for o in step(np.array([[1]]), np.array([0]), mask, *prefill[1:])[1:3]] == [(2, 1, 32)] * 2  # new rows only
    session = DecodeSession(tmp_path / "lm.tflite")
    session.reset(prefill[1:])
    got = [int(np.argmax(prefill[0][0, n - 1]))]
    for pos in range(n, n + 11):
        got.append(int(np.argmax(session.step(got[-1], pos))))
    assert got == want
    with pytest.raises(EdgeqError, match="position 32 is outside the decode signature's 32 cache slots"):
        session.step(1, 32)
    # the slot count is the session's choice: 8 slots grown as the loop passes them, or 100, the same tokens
    assert meta["graph"]["decode"]["dynamic_slots"] and meta["parity"]["decode"]["resized"]["max_abs_vs_declared"] < 1e-4
    for session in (DecodeSession(tmp_path / "lm.tflite", slots=8, grow=True), DecodeSession(tmp_path / "lm.tflite", slots=100)):
        session.reset(prefill[1:])
        got = [int(np.argmax(prefill[0][0, n - 1]))]
        for pos in range(n, n + 11):
            got.append(int(np.argmax(session.step(got[-1], pos))))
        assert got == want
    assert session.cache_len == 100 and DecodeSession(tmp_path / "lm.tflite", slots=8, grow=True).cache_len == 8
    with pytest.raises(EdgeqError, match="slots must be a whole number >= 1"):
        DecodeSession(tmp_path / "lm.tflite", slots=0)


def test_decode_signature_options(tmp_path):
    meta = export("tiny-llama", "tflite", tmp_path / "a.tflite", seq_len=16, cache_len=0)
    assert meta["graph"]["decode"] is None and "cache_len = 0" in meta["graph"]["decode_note"]
    from edgeq.export.tflite_runtime import TfliteRunner

    with pytest.raises(EdgeqError, match="signature 'decode' is not one of: serving_default"):
        TfliteRunner(tmp_path / "a.tflite", signature="decode")
    from edgeq.export.tflite_runtime import xnnpack_coverage

    assert list(meta["graph"]["xnnpack"]) == ["serving_default"]
    with pytest.raises(EdgeqError, match="signature 'decode' is not in the file"):
        xnnpack_coverage((tmp_path / "a.tflite").read_bytes(), "decode")
    with pytest.raises(EdgeqError, match="cache_len applies to decoder LMs"):
        export(CNN, "tflite", tmp_path / "b.tflite", cache_len=8)
    with pytest.raises(EdgeqError, match="cache_len must be a whole number"):
        export("tiny-llama", "tflite", tmp_path / "c.tflite", cache_len=-1)
    with pytest.raises(EdgeqError, match=r"cache_len \(8\) must be at least seq_len \(16\)"):
        export("tiny-llama", "tflite", tmp_path / "c.tflite", seq_len=16, cache_len=8)
    assert not (tmp_path / "b.tflite").exists() and not (tmp_path / "c.tflite").exists()


def test_dynamic_slots_are_proven_by_running_them():
    """The slot count becomes a run-time choice only where the step resized gives the declared step's logits: the graph
    as litert-torch converts it (slots fixed) fails that check by name, the same graph after `dynamic_slots` passes."""
    from edgeq.export.tflite_decode import dynamic_slots, resize_check
    from edgeq.export.tflite_flatbuffer import read_model, schema, write_model
    from edgeq.export.tflite_graph import convert

    bundle = load_model("tiny-llama")
    buf = convert(bundle, bundle.module.eval(), 8, None, 24)
    assert "fixed 24 cache slots" in resize_check(buf, 24)
    model_t = read_model(buf)
    assert dynamic_slots(model_t, 25) == "no slice of the cached slots' probabilities found"  # not the declared count
    assert dynamic_slots(model_t, 24) is None and resize_check(write_model(model_t), 24) is None
    # a constant still naming the slot count (the slices' end put back) is caught by LiteRT when the step runs resized
    end = next(t for sg in model_t.subgraphs for t in sg.tensors if t.name == b"edgeq/slots_end")
    model_t.buffers[end.buffer].data = np.frombuffer(np.array([2, 2, 25], dtype=np.int32).tobytes(), dtype=np.uint8)
    for op in (op for sg in model_t.subgraphs for op in sg.operators):
        if op.builtinOptionsType == schema().BuiltinOptions.StridedSliceOptions:
            op.builtinOptions.endMask = 0
    assert resize_check(write_model(model_t), 24).startswith("resized to 31 slots, the step failed: ")


def test_decode_signature_only_for_layouts_it_renders():
    """Llama-family layouts get edgeq's own step; other decoders, and those whose sliding window is not longer than
    the cache, `HFDecode`, if it reproduces their logits on a probe (GPT-2 does); a model without attention caches
    (Mamba) gets none."""
    from transformers import (GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    from edgeq.export.tflite_decode import KVDecode, decode_module, unsupported_reason
    from edgeq.export.tflite_hfdecode import HFDecode

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    assert unsupported_reason(gpt2, 32) is None
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4)).eval()
    assert "edgeq's decode step cannot run MambaForCausalLM" in unsupported_reason(mamba, 32)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=64)
    mistral = MistralForCausalLM(MistralConfig(sliding_window=16, **small)).eval()
    assert unsupported_reason(mistral, 15) is None and isinstance(decode_module(mistral, 15), KVDecode)
    assert unsupported_reason(mistral, 16) is None and isinstance(decode_module(mistral, 16), HFDecode)
    assert unsupported_reason(load_model("tiny-llama").module, 256) is None


def test_fp32_from_model_reference(exported):
    meta = exported["cnn-fp32"][1]
    assert meta["inputs"][0]["shape"] == [1, 3, 224, 224] and meta["exact"] is None


@pytest.mark.parametrize("recipe", ["w8", "w8a16-static"])
def test_encoder_exports_exactly_without_its_unused_pooler(tiny_bert, tmp_path, recipe):
    """LayerNorm gains and sdpa's query/key scaling are not folded into the linears (the integers read back
    bitwise), the pooler the embeddings do not use is reported as left out, parity compares the sentences' tokens
    and not the padding to the file's fixed length, which no embedding reads, and `edgeq eval` pads sentences to
    the file's fixed length."""
    from edgeq.evaluate import evaluate
    from edgeq.export.meta import held_back_inputs

    qdir = _qdir(tmp_path, tiny_bert, recipe, "q")
    path = tmp_path / "bert.tflite"
    meta = export(qdir, "tflite", path)
    assert meta["exact"] is True, meta["readback"]["mismatches"]
    assert meta["layers_not_in_file"]["layers"] == ["pooler.dense"]
    assert meta["readback"]["layers"] == len(load_quantized(qdir).layers()) - 1
    assert meta["parity"]["cos_min"] > 0.98, meta["parity"]
    assert meta["inputs"][0]["shape"] == [1, 64]
    tokens = sum(min(int(mask.sum()), 64) for _, mask in held_back_inputs(load_model(tiny_bert)))
    assert meta["parity"]["rows"] == tokens < 4 * 64 and meta["parity"]["noise_floor"]["rows"] == tokens, meta["parity"]
    assert meta["parity"]["tolerance"]["top1_agree"] is None and "hidden states" in meta["parity"]["tolerance"]["note"]
    metrics = evaluate(str(path), task="cosine", count=4)["metrics"]
    assert metrics["sentences"] == 4 and metrics["cosine_min"] > 0.98, metrics


@pytest.mark.parametrize("recipe", ["w8", "w8a8-static"])
def test_decoder_scaling_its_queries_exports_exactly(tiny_opt, tmp_path, recipe):
    """OPT-style attention (`q_proj(x) * scaling`, no rotary embedding) converts with the scaling applied to the
    scores, so q_proj's integers and scales are in the file as quantized, like every other layer's (the head's
    all-zero padding row included), and no layer is reported as dropped."""
    qdir = _qdir(tmp_path, tiny_opt, recipe, "q")
    meta = export(qdir, "tflite", tmp_path / "opt.tflite")
    assert meta["exact"] is True, meta["readback"]["mismatches"]
    assert meta.get("layers_not_in_file") is None
    assert meta["readback"]["layers"] == len(load_quantized(qdir).layers())
    assert "model.decoder.layers.0.self_attn.q_proj" in meta["readback"]["per_layer"]
    assert meta["parity"]["within_tolerance"], meta["parity"]


@pytest.mark.parametrize("recipe", ["w8", "w4-g64-litert"])
def test_gemma_norms_fold_and_render_with_their_offset(tiny_gemma, tmp_path, recipe):
    """Gemma's RMSNorm gain is 1 + weight: `w8` folds it into the linears and `w4-g64-litert` keeps it, rendered so the
    converter cannot fold it. Either way the quantized model stays the float model's function and the file is
    within tolerance of it (before, both went wrong: a fold left a gain of 2, the rendering a gain of weight)."""
    qdir = _qdir(tmp_path, tiny_gemma, recipe, "q")
    meta = export(qdir, "tflite", tmp_path / "gemma.tflite")
    assert meta["exact"] is True and meta["parity"]["within_tolerance"], meta["parity"]
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = load_model(tiny_gemma).module(ids).logits
        sim_logits = load_quantized(qdir).model(ids).logits
    assert torch.nn.functional.cosine_similarity(float_logits.flatten(), sim_logits.flatten(), dim=0) > 0.99


def test_qwen3_decode_signature_norms_queries_and_keys(tiny_qwen3, tmp_path):
    """Qwen3 normalizes each query and key head before the rotary embedding; its decode step does the same and steps
    like the simulation, from an empty cache and after the prefill."""
    qdir = _qdir(tmp_path, tiny_qwen3, "w8", "q")
    meta = export(qdir, "tflite", tmp_path / "qwen3.tflite", seq_len=16, cache_len=32)
    assert meta["exact"] is True and meta["graph"]["decode"]["cache_len"] == 32
    decode = meta["parity"]["decode"]
    assert decode["cos_min"] > 0.999 and decode["after_prefill"]["cos_min"] > 0.999, decode
    assert meta["parity"]["within_tolerance"]


def test_gpt2_loads_as_a_decoder_with_linear_projections(tiny_gpt2, tmp_path):
    """GPT-2 is a decoder LM (GPT2LMHeadModel) whose Conv1D projections load as equal torch.nn.Linear layers, so
    they are quantized and exported like any other (before: loaded as an encoder, and no layer to quantize)."""
    import transformers

    bundle = load_model(tiny_gpt2)
    assert bundle.kind == "causal-lm"
    assert isinstance(bundle.module.transformer.h[0].attn.c_attn, torch.nn.Linear)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()(ids).logits
        assert torch.allclose(bundle.module(ids).logits, want, atol=1e-5)
    qdir = _qdir(tmp_path, tiny_gpt2, "w8a8-static", "q")
    meta = export(qdir, "tflite", tmp_path / "gpt2.tflite")
    assert meta["exact"] is True and meta["parity"]["within_tolerance"], meta["parity"]
    assert meta["readback"]["layers"] == len(load_quantized(qdir).layers()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2


def test_cli_warns_when_a_file_is_outside_the_parity_tolerance(capsys, tmp_path, monkeypatch):
    """A file whose outputs miss the tolerance is kept (it may still be what the user wants) with a warning on
    stderr, which leaves the JSON on stdout as it is."""
    from edgeq.cli.main import main
    from edgeq.export import verdict

    monkeypatch.setitem(verdict.TOLERANCE, "fp32", (1.5, 1.5))  # a cosine above 1: no file can meet it
    out = tmp_path / "cnn.tflite"
    assert main(["export", CNN, "--format", "tflite", "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    parity = json.loads(captured.out)["parity"]
    assert parity["within_tolerance"] is False and out.exists()
    # the warning names each check missed, as FILE.json's parity.missed does
    assert parity["missed"] == [f"cos_min {parity['cos_min']:.4f} < 1.5", f"top1_agree {parity['top1_agree']:.4f} < 1.5"]
    assert captured.err.startswith("edgeq: warning:") and "beyond the tolerance: cos_min" in captured.err
    assert all(m in captured.err for m in parity["missed"])
    assert "run-time activation grid" not in captured.err  # an fp32 file has no hybrid kernels


def test_cli_json_is_all_of_stdout_while_the_graph_converts(capsys, caplog, recwarn, tmp_path, monkeypatch):
    """A conversion that runs (no cached float graph) prints nothing on stdout but the file's JSON: litert-torch
    prints its conversion steps there unless told not to, which broke `--json | jq` on a first export. Nor do the
    converters' messages to their own callers reach the user: litert-torch's int32 inputs, torch.export's deprecation."""
    import edgeq.cache
    from edgeq.cli.main import main

    for name in ("LITERT_TORCH_SHOW_PROGRESS", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    graphs = tmp_path / "graphs"  # nothing converted yet (the models stay in the cache they were built in)
    cache_dir = edgeq.cache.cache_dir
    monkeypatch.setattr(edgeq.cache, "cache_dir", lambda *parts: graphs if parts == ("tflite-graphs",) else cache_dir(*parts))
    graphs.mkdir()
    for source, name in ((CNN, "cnn.tflite"), ("tiny-llama", "lm.tflite")):
        assert main(["export", source, "--format", "tflite", "--cache-len", "0", "-o", str(tmp_path / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["format"] == "tflite"
    assert len(list(graphs.glob("*.tflite"))) == 2  # both graphs converted here
    assert not [r for r in caplog.records if "enable_x64" in r.getMessage()]
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]


def test_cli_keeps_the_runtimes_native_info_lines_off_stderr(tmp_path):
    """A first export in a fresh process loads litert-torch's converter (TensorFlow's oneDNN line, absl's notice) and
    creates the process's first XNNPACK delegate (LiteRT's INFO line; here in ai-edge-quantizer's calibration of the
    output grids), all written by native code to descriptor 2: none reaches the user. TF_CPP_MIN_LOG_LEVEL=0 brings
    LiteRT's line back."""
    import os
    import subprocess
    import sys

    from edgeq.console import NATIVE_CHATTER

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["EDGEQ_CACHE"] = str(tmp_path / "cache")  # no converted graph: the converter loads
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    edgeq = [sys.executable, "-c", "import sys; from edgeq.cli.main import main; sys.exit(main())"]

    qdir = _qdir(tmp_path, CNN, "w8a8-static", "q")

    def export(name: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*edgeq, "export", str(qdir), "--format", "tflite", "-o", str(tmp_path / name)],
                              env={**env, **extra}, capture_output=True, text=True, check=True)

    quiet = export("a.tflite")
    assert f"{tmp_path / 'a.tflite'}: tflite int8" in quiet.stdout
    assert not [line for line in NATIVE_CHATTER if line in quiet.stderr], quiet.stderr
    loud = export("b.tflite", TF_CPP_MIN_LOG_LEVEL="0")  # the graph is cached now: only the interpreter speaks
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in loud.stderr


def test_native_chatter_dropped_keeps_every_other_line_in_order():
    """In the CLI's process, what native code and Python write to descriptor 2 inside the block comes out after it, in
    order, without the known INFO lines; with TF_CPP_MIN_LOG_LEVEL=0, or in a process that is not the CLI's (a library
    caller's, an agent's job runner, which reads LiteRT's lines), nothing is dropped. In processes of their own:
    pytest's capture gives Python's stderr and descriptor 2 two different files."""
    import os
    import subprocess
    import sys

    code = """if True:
        import os, sys
        from edgeq import console
        if sys.argv[1] == "cli":
            console.quiet_converters()
        with console.native_chatter_dropped():
            os.write(2, f"{console.NATIVE_CHATTER[0]}\\nnative error\\n".encode())
            print("python warning", file=sys.stderr, flush=True)
            os.write(2, f"I0000 port.cc:153] {console.NATIVE_CHATTER[1]}. You see\\n{console.NATIVE_CHATTER[2]}\\n".encode())
        print("after", file=sys.stderr)
    """
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])

    def stderr(process: str, **extra: str) -> str:
        return subprocess.run([sys.executable, "-c", code, process], env={**env, **extra}, capture_output=True,
                              text=True, check=True).stderr

    assert stderr("cli") == stderr("cli", TF_CPP_MIN_LOG_LEVEL="2") == "native error\npython warning\nafter\n"
    assert stderr("cli", TF_CPP_MIN_LOG_LEVEL="0").count("\n") == 6
    assert stderr("library", TF_CPP_MIN_LOG_LEVEL="1").count("\n") == 6


def test_within_noise_floor_takes_every_check():
    """A file is within the noise floor when its worst rows (the decode step's too), top-1 agreement and NLL are no
    further from the simulation than the simulation under float noise is, the worst of its draws."""
    from edgeq.export.verdict import within_noise_floor

    floor = {"cos_min": 0.90, "top1_agree": 0.93, "nll_spread": 0.01, "draws": 3}
    parity = {"cos_min": 0.92, "top1_agree": 0.94, "nll": {"file": 3.215, "simulation": 3.217}, "noise_floor": floor,
              "decode": {"cos_min": 0.95, "after_prefill": {"cos_min": 0.96}}}
    assert within_noise_floor(parity) is True
    assert within_noise_floor({**parity, "noise_floor": None}) is None  # an fp32 file: nothing to perturb
    for worse in ({"cos_min": 0.89}, {"top1_agree": 0.92}, {"nll": {"file": 3.23, "simulation": 3.217}},
                  {"decode": {"cos_min": 0.95, "after_prefill": {"cos_min": 0.85}}}):
        assert within_noise_floor({**parity, **worse}) is False, worse


def test_verdict_text_reads_a_miss_by_what_explains_it():
    """The report's one line per file: within tolerance, or each check missed and whether float noise (the simulation
    against itself) or a rounding the file does (the run-time grid, the output grids) explains it; nothing from a
    FILE.json written before verdicts."""
    from edgeq.export.verdict import verdict_text

    miss = {"within_tolerance": False, "missed": ["cos_min 0.9000 < 0.97", "top1_agree 0.8000 < 0.85"]}
    assert verdict_text({"within_tolerance": True, "missed": []}) == "within tolerance"
    assert verdict_text({**miss, "within_noise_floor": True}).endswith("; within the simulation's own noise floor")
    assert verdict_text({**miss, "within_noise_floor": False, "runtime_grid": {"within_noise_floor": True}}) == (
        "misses cos_min 0.9000 < 0.97, top1_agree 0.8000 < 0.85; explained by LiteRT's run-time activation grid")
    # SmolLM2's w8.onnx in make demo: its worst row under the floor's, its top-1 and mean NLL within it
    floor = {"cos_min": 0.9404, "top1_agree": 0.8867, "nll_spread": 0.0137}
    demo = {"cos_min": 0.9374, "top1_agree": 0.9141, "nll": {"file": 3.1948, "simulation": 3.1989}, "noise_floor": floor,
            "within_tolerance": False, "missed": ["cos_min 0.9374 < 0.99"], "within_noise_floor": False}
    assert verdict_text(demo) == ("misses cos_min 0.9374 < 0.99; below the simulation's noise floor (cos_min 0.9374 < "
                                  "0.9404), mean NLL within it: check the file")
    far = {**demo, "nll": {"file": 3.5, "simulation": 3.1989}, "cos_min": 0.95}
    assert verdict_text(far).endswith("below the simulation's noise floor (mean NLL): check the file")
    assert verdict_text({**miss, "within_noise_floor": None}).endswith("no noise floor to set it against: check the file")
    assert verdict_text({"cos_min": 1.0, "top1_agree": 1.0}) is None


def test_an_encoders_top1_agreement_has_no_bound():
    """An encoder's rows are hidden states: its verdict holds the worst row's cosine to the variant's bound and leaves
    top-1 agreement unbounded, saying why; other models are held to both. The noise floor still reads top-1."""
    from edgeq.export.verdict import ENCODER_TOP1, TOLERANCE, tolerance_verdict

    floor = {"cos_min": 0.98, "top1_agree": 0.80}
    parity = {"cos_min": 0.983, "top1_agree": 0.813, "noise_floor": floor}  # MiniLM's w8a8-static-fc2a16 TFLite file
    encoder = tolerance_verdict(parity, "int8", kind="encoder")
    assert encoder["within_tolerance"] is True and encoder["missed"] == []
    assert encoder["tolerance"] == {"cos_min": TOLERANCE["int8"][0], "top1_agree": None, "note": ENCODER_TOP1}
    assert tolerance_verdict(parity, "int8", kind="causal-lm")["missed"] == ["top1_agree 0.8130 < 0.85"]
    assert tolerance_verdict({**parity, "cos_min": 0.96}, "int8", kind="encoder")["missed"] == ["cos_min 0.9600 < 0.97"]
    below = tolerance_verdict({**parity, "top1_agree": 0.79}, "int8", kind="encoder")
    assert below["within_tolerance"] is True and below["within_noise_floor"] is False  # top-1 under the floor's


def test_cli_notes_a_miss_within_the_noise_floor(capsys, tmp_path, monkeypatch, tiny_llama_ref):
    """Where the simulation under float noise is as far from itself as the file is from it, a missed tolerance is a note
    saying so, not a warning to check the file (here the noise is made wide: one part in a hundred)."""
    import functools

    from edgeq.cli.main import main
    from edgeq.export import meta, verdict

    qdir = _qdir(tmp_path, tiny_llama_ref, "w4-g128-litert", "q")
    monkeypatch.setitem(verdict.TOLERANCE, "int4", (1.5, 1.5))
    monkeypatch.setattr(meta, "perturbed_quant_inputs", functools.partial(meta.perturbed_quant_inputs, rel=1e-2))
    out = tmp_path / "w4.tflite"
    assert main(["export", str(qdir), "--format", "tflite", "--cache-len", "0", "-o", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    parity = json.loads(Path(str(out) + ".json").read_text())["parity"]
    assert parity["within_tolerance"] is False and parity["within_noise_floor"] is True, parity
    floor = parity["noise_floor"]  # drawn until the file is within it
    assert meta.NOISE_DRAWS_MIN <= floor["draws"] == len(floor["per_draw"]["cos_min"]) <= meta.NOISE_DRAWS
    assert floor["nll_spread"] > 0 and min(floor["per_draw"]["cos_min"]) == floor["cos_min"]
    assert "edgeq: note: " in err and "misses the parity tolerance" in err and "edgeq: warning" not in err


def test_cli_notes_a_miss_its_output_grids_explain(capsys, tmp_path, monkeypatch, exported):
    """A full-integer file outside its tolerance, and outside the plain simulation's noise floor, but within the noise
    floor of the simulation with the file's output grids, computes what edgeq simulates: a note says the grids make
    the difference, with the numbers, instead of the warning to check the file."""
    from edgeq.cli.main import main
    from edgeq.export import verdict

    monkeypatch.setitem(verdict.TOLERANCE, "int8", (1.5, 1.5))
    out = tmp_path / "int8.tflite"
    qdir = exported["llama-int8"][2]
    assert main(["export", str(qdir), "--format", "tflite", "--cache-len", "0", "-o", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    parity = json.loads(Path(str(out) + ".json").read_text())["parity"]
    assert parity["within_tolerance"] is False and parity["within_noise_floor"] is False, parity
    assert parity["with_output_grids"]["within_noise_floor"] is True, parity["with_output_grids"]
    assert "edgeq: warning" not in err and "misses the parity tolerance" in err, err
    assert "with the file's output grids than that simulation is from itself" in err
    assert "against the simulation with the file's output grids" in err and "that simulation's mean NLL" in err


def test_cli_sets_a_hybrid_files_miss_beside_the_run_time_grid(capsys, tmp_path, monkeypatch, tiny_llama_ref):
    """For a hybrid file the warning's notes also give its parity against the simulation with the run-time grid."""
    from edgeq.cli.main import main
    from edgeq.export import verdict

    qdir = _qdir(tmp_path, tiny_llama_ref, INT4_FLOAT_ACTS, "q")
    monkeypatch.setitem(verdict.TOLERANCE, "int4", (1.5, 1.5))
    out = tmp_path / "w4.tflite"
    assert main(["export", str(qdir), "--format", "tflite", "--cache-len", "0", "-o", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    runtime = json.loads(Path(str(out) + ".json").read_text())["parity"]["runtime_grid"]
    assert "edgeq: note: against the simulation with LiteRT's run-time activation grid" in err
    assert f"cos_min {runtime['cos_min']:.4f}" in err and "it against itself perturbed" in err


def test_unused_layers_only_those_the_outputs_do_not_reach(exported):
    """Layers that feed other quantized layers reach the logits too: none of tiny-llama's is unused."""
    from edgeq.export.tflite_render import unused_layers

    qmodel = load_quantized(exported["llama-dynamic-int8"][2])
    assert unused_layers(qmodel.bundle, qmodel.model, 16) == set()


# ---- unsupported combinations: the promised error, and no file left behind --------------------

W = {"match": "lm_head$", "skip": True}
REFUSED = {
    "int3": (_custom([W, {"match": ".*", "weight": {"bits": 3, "granularity": "group", "group_size": 128, "scale_dtype": "bf16"}}]),
             None, r"no 3-bit weight kernels.*w4-g128-litert"),
    "asym-int4": (_custom([W, {"match": ".*", "weight": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 128, "scale_dtype": "bf16"}}]),
                  None, r"symmetric.*w4-g128-litert"),
    "group16": (_custom([W, {"match": ".*", "weight": {"bits": 4, "granularity": "group", "group_size": 16, "scale_dtype": "bf16"}}]),
                None, r"block sizes 32, 64, 128, 256.*group_size = 32"),
    "fp32-scales": (_custom([W, {"match": ".*", "weight": {"bits": 4, "granularity": "group", "group_size": 64}}]),
                    None, r"fp16/bf16.*scale_dtype = 'bf16'"),
    "int4-acts": (_custom([W, {"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "dynamic", "bits": 4}}]),
                  None, r"4-bit activations.*w8a8"),
    "int8-from-dynamic": ("w8", "int8", r"full integer.*w8a8"),
    "int8-from-int16": ("w8a16-static", "int8", r"static 8-bit activations.*w8a8-static.*int16x8"),
    "int16x8-from-int8": ("w8a8-static", "int16x8", r"static 16-bit activations.*w8a16-static.*--variant int8"),
    "full-range-int4": ("w4-g128-rtn", None, r"full-range INT4.*recipe w4-g128-litert"),
    "dynamic-from-static": (_custom([W, {"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "static"}}]),
                            "dynamic-int8", r"static activations need --variant int8"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_combinations_refused(tmp_path, case):
    recipe, variant, pattern = REFUSED[case]
    qdir = _qdir(tmp_path, "tiny-llama", recipe, "q")
    out = tmp_path / "model.tflite"
    with pytest.raises(EdgeqError, match=pattern):
        export(qdir, "tflite", out, variant=variant)
    assert not out.exists() and not Path(str(out) + ".json").exists()
    said = json.loads((qdir / "quant.json").read_text())["tflite"]  # quant.json said so when it was quantized
    verdict = said["variants"][variant or said["default_variant"]]
    assert verdict["representable"] is False and re.search(pattern, verdict["why"]), verdict
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.tflite")]


def test_int8_weight_outside_litert_range_refused(tmp_path):
    """A QDIR holding -128 on an 8-bit weight grid (what GPTQ wrote before it kept 8-bit narrow grids in range) is
    refused by name: LiteRT's int8 weights are [-127, 127] and the converter would clip it silently."""
    bundle = load_model("tiny-llama")
    recipe = load_recipe("w8")
    qm = quantize_model(bundle, recipe, calibration_batches(bundle, None, 8, 128))
    name, layer = next(iter(qm.layers().items()))
    layer.qweight[0, 0] = -128
    qdir = qm.save(tmp_path / "q")
    with pytest.raises(EdgeqError, match=f"{name}.*holds the integer -128, outside LiteRT's int8 weight range"):
        export(qdir, "tflite", tmp_path / "m.tflite")
    assert "holds the integer -128" in json.loads((qdir / "quant.json").read_text())["tflite"]["variants"]["dynamic-int8"]["why"]
    assert not (tmp_path / "m.tflite").exists()


def test_quantized_variant_needs_a_qdir(tmp_path):
    with pytest.raises(EdgeqError, match="needs a quantized-model directory"):
        export(CNN, "tflite", tmp_path / "m.tflite", variant="int8")
    with pytest.raises(EdgeqError, match="variant"):
        export(CNN, "tflite", tmp_path / "m.tflite", variant="int2")
    assert not list(tmp_path.iterdir())


def _float_vs_simulation(model_dir: str, qdir: Path) -> float:
    """Cosine of the quantized model's logits against the float model's on 32 random tokens."""
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_model(model_dir).module(ids).logits.double()
        b = load_quantized(qdir).model(ids).logits.double()
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_gemma2_sandwich_norms_fold_into_the_linears_they_feed(tiny_gemma2, tmp_path):
    """Which norm feeds which linears is measured: Gemma 2's MLP reads `pre_feedforward_layernorm`, while its
    `post_attention_layernorm` normalizes the attention's output. Folding by name put the latter's gain into the MLP
    (sim vs float cosine 0.36 in the families check). The ONNX decode graph counts positions from its full-attention
    layer's cache, not from the sliding layer's, which keeps its last 7 tokens only (before: the decode step's logits
    differed from the prefill graph's by 0.7 on Gemma 3). The logits' soft-capping divides before the head in the
    TFLite file (before: "the converter changed the weight of layer 'lm_head'"). Its TFLite decode step (HFDecode)
    leaves the slots the window has passed out of the sliding layer, over a cache four times the window (before: no
    decode signature for a cache longer than the window)."""
    from edgeq.quantize.transforms import llama_norm_groups

    groups = dict(llama_norm_groups(load_model(tiny_gemma2).module))
    assert groups["model.layers.0.pre_feedforward_layernorm"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert groups["model.layers.1.input_layernorm"] == [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    assert not any("post_" in n for n in groups)
    qdir = _qdir(tmp_path, tiny_gemma2, "w8", "q")
    assert _float_vs_simulation(tiny_gemma2, qdir) > 0.99
    meta = export(qdir, "tflite", tmp_path / "gemma2.tflite", seq_len=16, cache_len=32)
    assert meta["exact"] is True and meta["readback"]["layers"] == 15, meta.get("readback")
    assert meta["parity"]["within_tolerance"], meta["parity"]
    decode = meta["parity"]["decode"]  # 16 steps from an empty cache; 8 after a prefill of 8: past the window
    assert decode["cos_min"] > 0.99 and decode["after_prefill"]["cos_min"] > 0.99, decode
    # the window's mask is computed from the mask input: the slot count stays the runtime's choice
    assert "HFDecode" in meta["graph"]["decode"]["step"] and meta["graph"]["decode"]["dynamic_slots"], meta["graph"]["decode"]
    onnx_meta = export(qdir, "onnx", tmp_path / "gemma2.onnx")  # parity: 64 tokens, past the window of 8
    assert onnx_meta["parity"]["cos_min"] > 0.999 and onnx_meta["parity"]["decode_vs_prefill_max_abs"] < 1e-4, onnx_meta["parity"]


def test_phi3_fused_projections_quantize_and_export(tiny_phi3, tmp_path):
    """Phi-3's norms feed one fused qkv_proj and one gate_up_proj; it has no up_proj for SmoothQuant's row groups
    (before: `w8` stopped with "Phi3MLP has no attribute up_proj")."""
    from edgeq.quantize.transforms import llama_norm_groups

    groups = dict(llama_norm_groups(load_model(tiny_phi3).module))
    assert groups["model.layers.0.input_layernorm"] == ["model.layers.0.self_attn.qkv_proj"]
    assert groups["model.layers.0.post_attention_layernorm"] == ["model.layers.0.mlp.gate_up_proj"]
    qdir = _qdir(tmp_path, tiny_phi3, "w8a8-static", "q")
    assert _float_vs_simulation(tiny_phi3, qdir) > 0.99
    meta = export(qdir, "tflite", tmp_path / "phi3.tflite", seq_len=16, cache_len=32)
    assert meta["exact"] is True and meta["parity"]["within_tolerance"], meta["parity"]
    # a decode signature through Phi-3's own layers (`HFDecode`), stepping like the simulation
    assert "HFDecode" in meta["graph"]["decode"]["step"]
    decode = meta["parity"]["decode"]
    assert decode["cos_min"] > 0.99 and decode["after_prefill"]["cos_min"] > 0.99, decode


def test_attention_renderings_soft_cap_their_scores_as_gemma2_does():
    """edgeq's attention for graph export (`_grouped_attention`) and its decode step's (`_cached_attention`) against
    Gemma 2's eager attention, with scores large enough for the cap to matter (before, both dropped it)."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from edgeq.export import tflite_hfdecode
    from edgeq.models.hf import _grouped_attention

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, n, d = 4, 2, 6, 16
    q, k, v = (torch.randn(1, h, n, d, generator=g) * 3 for h in (heads, kv_heads, kv_heads))
    mask = torch.triu(torch.full((n, n), torch.finfo(torch.float32).min), 1)[None, None]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, layer_idx=0)
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.25, softcap=2.0)
    uncapped, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert not torch.allclose(uncapped, want, atol=1e-2)  # the cap matters here
    got, _ = _grouped_attention(module, q, k, v, mask, 0.25, softcap=2.0)
    assert torch.allclose(got, want, atol=1e-5)
    # the decode step: the last token over the others' keys and values in the signature's layout
    step = {"cache": (k[0, :, :-1], v[0, :, :-1].transpose(1, 2)), "mask": torch.zeros(1, 1, n - 1), "presents": {}}
    tflite_hfdecode._STEPS.append(step)
    try:
        out, _ = tflite_hfdecode._cached_attention(module, q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], None, scaling=0.25, softcap=2.0)
    finally:
        tflite_hfdecode._STEPS.pop()
    assert torch.allclose(out[0, 0], want[0, -1], atol=1e-5)


def test_granite_multipliers_fold_so_the_converter_keeps_the_integers(tiny_granite, tmp_path):
    """Granite scales each residual branch and the logits by constants after a linear layer, which LiteRT's converter
    folds into that layer's weight (before: "the converter changed the weight of layer ...o_proj"). Loading folds
    them into the weights first, exactly: the logits are transformers' own."""
    import transformers

    model = load_model(tiny_granite).module
    assert model.model.layers[0].residual_multiplier == 1.0 and model.config.logits_scaling == 1.0
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = transformers.GraniteForCausalLM.from_pretrained(tiny_granite).eval()(ids).logits
        assert torch.allclose(model(ids).logits, want, rtol=1e-4, atol=1e-6)
    qdir = _qdir(tmp_path, tiny_granite, "w8", "q")
    meta = export(qdir, "tflite", tmp_path / "granite.tflite")
    assert meta["exact"] is True and meta["readback"]["layers"] == 15, meta.get("readback")
    assert meta["parity"]["within_tolerance"], meta["parity"]


def test_layers_of_constant_inputs_are_reported_not_refused(tiny_deberta, tmp_path):
    """DeBERTa-v2 projects its relative-position table, the same for every input, in each layer: the converter
    computes those projections into constants. They are reported with the layers not in the file (before, the export
    stopped with "the converter changed the weight of layer ...pos_key_proj"), the rest read back bitwise."""
    qdir = _qdir(tmp_path, tiny_deberta, "w8", "q")
    meta = export(qdir, "tflite", tmp_path / "deberta.tflite")
    assert meta["exact"] is True and meta["parity"]["within_tolerance"], meta["parity"]
    constant = [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("pos_key_proj", "pos_query_proj")]
    assert sorted(meta["layers_not_in_file"]["layers"]) == sorted(constant)
    assert meta["readback"]["layers"] == len(load_quantized(qdir).layers()) - 4


def test_a_layer_the_converter_emits_twice_is_computed_once_and_quantized(tiny_electra, tmp_path):
    """The converter emits ELECTRA's embedding projection as two FULLY_CONNECTEDs reading one weight (a 2-D output for
    the attention inputs, a 3-D one for the residual). Before, only the labelled one was quantized: the other ran in
    float with a float copy of the weight, 0.063 from the simulation on LiteRT's run-time grid (2e-6 now), and the
    read-back could not see it. (Earlier still, ai-edge-quantizer's duplicate of that weight crashed INT4 blockwise
    quantization: "can only concatenate str (not "bytes") to str".) Now it is one FULLY_CONNECTED and a RESHAPE."""
    from edgeq.export.tflite_flatbuffer import op_names, read_model, schema

    qdir = _qdir(tmp_path, tiny_electra, "w4-g64-litert", "q")
    meta = export(qdir, "tflite", tmp_path / "electra.tflite")
    assert meta["exact"] is True and meta["parity"]["within_tolerance"], meta["parity"]
    layers = load_quantized(qdir).layers()
    assert meta["readback"]["layers"] == len(layers)
    model_t = read_model((tmp_path / "electra.tflite").read_bytes())
    codes, sg = op_names(model_t), model_t.subgraphs[0]
    fcs = [op for op in sg.operators if codes[op.opcodeIndex] == "FULLY_CONNECTED"]
    assert len(fcs) == sum(m.decision.kind == "linear" for m in layers.values()), len(fcs)
    assert all(sg.tensors[op.inputs[1]].type == schema().TensorType.INT4 for op in fcs)  # no float weight left
    assert meta["parity"]["max_abs"] < 1e-3, meta["parity"]


@pytest.mark.parametrize("case", [c for c, (_, recipe, variant) in CASES.items() if recipe and variant is None])
def test_checking_the_qdir_says_what_the_file_runs(exported, case, assert_plan_checks_as_written):
    path, _, qdir = exported[case]
    assert_plan_checks_as_written(qdir, path, "tflite")


def test_dynamic_depthwise_convs_run_outside_xnnpack(exported):
    """XNNPACK has no dynamically quantized depthwise convolution: a dynamic-range DEPTHWISE_CONV_2D stays on TFLite's
    built-in hybrid kernel and splits the delegated graph (what the profiles say, here read off the interpreter), so
    `check` calls it a fallback, from the file and from the plan. The `w8` preset keeps depthwise convs float: the
    whole graph is XNNPACK's and checks native."""
    from edgeq.targets import check

    mixed_path, mixed, _ = exported["cnn-int4"]  # CNN_MIXED: every layer dynamic, the depthwise one included
    assert mixed["graph"]["xnnpack"]["serving_default"]["builtin"] == {"DEPTHWISE_CONV_2D": 1}
    rows = {r.op: r.verdict.support for r in check(mixed_path, "rpi5").rows}
    assert rows["DEPTHWISE_CONV_2D"] == "fallback" and rows["CONV_2D"] == "native"
    path, meta, qdir = exported["cnn-dynamic-int8"]
    assert "dw" not in load_quantized(qdir).layers() and "pw" in load_quantized(qdir).layers()
    assert meta["graph"]["xnnpack"]["serving_default"] == {"nodes": meta["graph"]["xnnpack"]["serving_default"]["nodes"],
                                                           "partitions": 1, "builtin": {}}
    assert check(path, "rpi5").status == "native" and check(qdir, "rpi5", runtime="litert-xnnpack").status == "native"


@pytest.mark.parametrize("case", list(CASES))
def test_check_knows_which_layers_xnnpack_leaves_to_builtin_kernels(exported, case):
    """The interpreter's own account (FILE.json `graph.xnnpack`: the ops XNNPACK did not take) against the profiles:
    every weight op left on a built-in kernel is one `edgeq check` does not call native on XNNPACK, and no other."""
    from edgeq.targets import check

    path, meta, _ = exported[case]
    builtin: dict[str, int] = {}
    for coverage in meta["graph"]["xnnpack"].values():
        for op, n in coverage["builtin"].items():
            builtin[op] = builtin.get(op, 0) + n
    rows = check(path, "rpi5").rows
    for op in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL"):
        off = sum(r.count for r in rows if r.op == op
                  and (r.verdict.support != "native" or "built-in" in (r.verdict.kernel or "")))
        assert off == builtin.get(op, 0), (op, builtin, [(r.signature, r.count, r.verdict.support) for r in rows if r.op == op])


def test_target_gate_checks_the_variant_being_exported(exported, tmp_path):
    """`--variant fp32 --target` of a QDIR gates a float file: the recipe's 16x8 layers, which XNNPACK runs only through
    the reference kernels, refuse the recipe's own variant before converting, not the fp32 file."""
    _, _, qdir = exported["llama-int16x8"]
    with pytest.raises(EdgeqError, match=r"act=int16 .* falls back"):
        export(qdir, "tflite", tmp_path / "a16.tflite", target="rpi5")
    assert not list(tmp_path.iterdir())
    meta = export(qdir, "tflite", tmp_path / "fp32.tflite", variant="fp32", target="rpi5")
    assert meta["variant"] == "fp32" and meta["target"]["status"] == "native"


def test_a_dead_channels_bias_fits_its_int32_grid(tmp_path):
    """A folded norm's dead channel (gain 1e-9, shift 2) has a weight scale of ~1e-11, on which its bias needs ~1e13
    int32 steps: ai-edge-quantizer clipped it to ~0. It is rendered with zero integers on a scale its bias fits, so the
    int8 file's stem bias reads back 2 there; the layer's other channels keep edgeq's integers."""
    from ai_edge_litert.interpreter import Interpreter

    qdir = _qdir(tmp_path, "tests.export.onnx_cnn:dead_channel_cnn", "w8a8", "q", fold_batchnorms=False)
    path = tmp_path / "dead.tflite"
    meta = export(qdir, "tflite", path)
    stem = meta["readback"]["per_layer"]["stem"]
    assert stem["rescaled_channels"] == [2] and stem["ints"] and stem["scales"] and not meta["readback"]["mismatches"]
    assert meta["exact_integers"] is False
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    conv = next(op for op in it._get_ops_details() if op["op_name"] == "CONV_2D")  # the stem, first
    bias = it.get_tensor_details()[conv["inputs"][2]]
    values = it.get_tensor(conv["inputs"][2]).astype(np.float64) * bias["quantization_parameters"]["scales"]
    bn = dict(load_quantized(qdir).model.named_modules())["stem_bn"]
    shift = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    assert abs(values[2] - shift[2]) < 1e-3 and abs(shift[2] - 2.0) < 0.1, (values[2], shift[2])


def test_batchnorms_fold_into_their_convs_on_edgeqs_grid(tmp_path):
    """TFLite has no separate BatchNorm: each one after a quantized conv is folded into it with edgeq's integers kept
    and its scales times gamma / sqrt(var + eps) (negative gains: |scale| and negated integers), read back bitwise."""
    qdir = _qdir(tmp_path, "tests.export.onnx_cnn:batchnorm_cnn", "w8a8", "q", fold_batchnorms=False)
    meta = export(qdir, "tflite", tmp_path / "bn.tflite")
    assert meta["variant"] == "int8" and meta["bn_folded"] == {"stem": "stem_bn", "dw": "dw_bn", "pw": "pw_bn"}
    assert meta["exact"] is False and meta["exact_integers"] is True and not meta["readback"]["mismatches"]
    assert meta["parity"]["within_tolerance"], meta["parity"]


def test_16x8_biases_are_int32_where_no_input_can_overflow(exported, tmp_path, monkeypatch):
    """A 16x8 FULLY_CONNECTED's bias is stored as int32, the integers ai-edge-quantizer computed (it stores int64, which
    puts the layer on LiteRT's reference kernel: MiniLM-L6's int16x8 file took 256 ms a batch, 9.5 ms with int32
    biases), where the worst case over every input stays inside the optimized kernel's int32 accumulator; a layer
    whose worst case does not keeps int64. A layer without a bias is counted and bounded too."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeq.export import tflite_quant
    from edgeq.export.tflite_flatbuffer import read_model, schema

    path, meta, qdir = exported["cnn-int16x8"]
    record = meta["biases_16x8"]
    assert record["layers"] == record["int32_biases"] == 1 and record["int64_biases_kept"] == [] and 0 < record["accumulator_bound_max"] < 1
    it = Interpreter(model_path=str(path))
    op = next(o for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED")
    x, w, b = (it.get_tensor_details()[i] for i in op["inputs"])
    assert x["dtype"] == np.int16 and b["dtype"] == np.int32
    head = load_quantized(qdir).layers()["head"]
    want = np.round(head.bias.detach().double().numpy() / (x["quantization_parameters"]["scales"][0]
                                                            * w["quantization_parameters"]["scales"].astype(np.float64)))
    it.allocate_tensors()
    assert np.array_equal(it.get_tensor(b["index"]), want.astype(np.int32))  # ai-edge-quantizer's integers
    assert meta["parity"]["within_tolerance"], meta["parity"]
    assert exported["llama-int16x8"][1]["biases_16x8"]["without_bias"] == exported["llama-int16x8"][1]["biases_16x8"]["layers"]

    s = schema()
    monkeypatch.setattr(tflite_quant, "ACCUMULATOR_LIMIT", 1000)  # as if every layer could overflow
    kept = tmp_path / "kept.tflite"
    again = export(qdir, "tflite", kept)
    assert again["biases_16x8"]["int64_biases_kept"] == ["head"] and again["biases_16x8"]["int32_biases"] == 0
    model_t = read_model(kept.read_bytes())
    fc = next(op for sg in model_t.subgraphs for op in sg.operators if sg.tensors[op.inputs[0]].type == s.TensorType.INT16
              and model_t.operatorCodes[op.opcodeIndex].builtinCode == s.BuiltinOperator.FULLY_CONNECTED)
    assert model_t.subgraphs[0].tensors[fc.inputs[2]].type == s.TensorType.INT64
