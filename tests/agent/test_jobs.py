"""Jobs on a real agent: measurements, malformed models, external data, memory and time limits."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgeq.agent.client import AgentError
from edgeq.agent.onnxcheck import check_external_data, external_locations, graph_nodes, kernel_account
from edgeq.agent.runner import MAX_RAW_LATENCIES
from edgeq.errors import EdgeqError
from edgeq.fileio import sha256_file

from .conftest import make_onnx, make_qdq_onnx, make_token_onnx, run_job


def test_onnx_result_has_every_measurement(shared_agent, tiny_onnx):
    r = run_job(shared_agent.client(), tiny_onnx, {"runs": 30, "min_seconds": 0.2})
    assert r["state"] == "done" and r["status"] == "valid", r.get("error")
    lat = r["latency_ms"]
    assert lat["n"] >= 30 and lat["seconds"] >= 0.2
    capped = lat["n"] > MAX_RAW_LATENCIES  # a tiny model runs thousands of times in 0.2 s: the raw list is capped
    assert len(lat["raw"]) == min(lat["n"], MAX_RAW_LATENCIES) and ("raw_note" in lat) == capped
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["ci95_median"][0] <= lat["p50"] <= lat["ci95_median"][1]
    assert r["size_bytes"] == tiny_onnx.stat().st_size
    assert r["load_ms"] > 0 and r["first_inference_ms"] > 0 and r["warmup"]["runs"] >= 2
    assert r["runtime"]["name"] == "onnxruntime" and r["runtime"]["provider"] == "CPUExecutionProvider"
    assert r["peak_rss_mb"] > 10 and r["threads"] == 1
    assert r["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 64, 16],
                            "dims": {"batch": 1, "sequence": 64}, "range": None, "from": "model signature"}]
    assert r["power"]["energy_per_inference_mj"] is None and r["power"]["reason"]
    fp = r["fingerprint"]
    assert fp["kernel"] and fp["python"] and fp["runtimes"]["onnxruntime"]
    assert "before" in r["conditions"] and "after" in r["conditions"]


def test_a_relative_data_dir_runs_jobs(agent_factory, tiny_onnx):
    """`edgeq agent serve --data-dir data`: the runner works in its job's directory, so every path the agent hands
    it must not be relative to where the agent started (the runner's result went under the job's own directory and
    each job failed: "the runner exited with code 3 without a result")."""
    agent = agent_factory(relative=True)
    r = run_job(agent.client(), tiny_onnx, {"runs": 5, "min_seconds": 0.05})
    assert r["state"] == "done" and r["status"] == "valid", r.get("error")
    assert list((agent.root / "data" / "jobs").glob("*/result.json"))


def _ort_optimized(model: Path, out: Path):
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


def test_onnx_result_says_which_kernels_ran(shared_agent, tmp_path):
    """What ONNX Runtime on the agent made of a file, from the graph it optimized there: a QDQ MatMul with its
    activations on grids runs as QLinearConv; a weight-only Conv stays float on the dequantized weight, and the result
    warns. The counts are those of the same graph read with the onnx package."""
    fused = make_qdq_onnx(tmp_path / "qdq.onnx", activations=True)
    r = run_job(shared_agent.client(), fused)
    assert r["status"] == "valid", r.get("error")
    kernels = r["runtime"]["kernels"]
    assert kernels["ops"].get("QLinearConv") == 1 and "Conv" not in kernels["ops"], kernels
    assert kernels["integer"] == {"QLinearConv": 1}
    assert kernels["float_on_dequantized"] == {} and not any("ONNX Runtime" in w for w in r["warnings"])
    assert not [p for p in (shared_agent.root).rglob("optimized.*")]  # the second session's files are gone

    weight_only = make_qdq_onnx(tmp_path / "wo.onnx", activations=False)
    r = run_job(shared_agent.client(), weight_only)
    kernels = r["runtime"]["kernels"]
    assert kernels["float_on_dequantized"] == {"Conv": 1}, kernels
    assert ("ONNX Runtime here runs 1 Conv on float kernels over dequantized tensors (not fused into integer "
            "kernels)") in r["warnings"]
    model = _ort_optimized(weight_only, tmp_path / "wo.opt.onnx")
    assert kernels["ops"] == dict(sorted(Counter(n.op_type for n in model.graph.node).items()))

    r = run_job(shared_agent.client(), make_onnx(tmp_path / "f32.onnx"))  # a float file: nothing dequantized
    assert r["runtime"]["kernels"] == {"nodes": 1, "ops": {"MatMul": 1}, "integer": {}, "float_on_dequantized": {}}


def test_kernel_account_failing_leaves_a_note(tmp_path):
    """The second session may fail (here the file is gone; on a board, the memory limit): the account is null with
    the reason, and the job keeps what it measured."""
    from edgeq.agent.runtimes import load

    path = make_qdq_onnx(tmp_path / "qdq.onnx", activations=True)
    model = load(path, 1)
    path.unlink()
    got = model.deferred_coverage()
    assert got["kernels"] is None and got["kernels_note"].startswith("not measured: a second session"), got
    assert "NoSuchFile" in got["kernels_note"]  # an ORT error (not an OSError) is caught too


def test_graph_nodes_reads_what_onnx_reads(tmp_path):
    """The torch- and onnx-free wire-format reader gives each node's op type, domain, inputs and outputs as the onnx
    package does, here on an ONNX Runtime-optimized graph with com.microsoft ops."""
    model = _ort_optimized(make_qdq_onnx(tmp_path / "qdq.onnx", activations=True), tmp_path / "opt.onnx")
    assert [tuple(n) for n in graph_nodes(tmp_path / "opt.onnx")] == [
        (n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    assert any(n.domain == "com.microsoft" for n in model.graph.node)  # ONNX Runtime's NHWC QLinearConv
    assert kernel_account(graph_nodes(tmp_path / "opt.onnx"))["float_on_dequantized"] == {}


def test_metadata_inputs_and_dims(shared_agent, tmp_path):
    model = make_token_onnx(tmp_path / "tok.onnx")
    meta = {"inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "sequence"], "range": [0, 50]}]}
    r = run_job(shared_agent.client(), model, {"dims": {"sequence": 7}}, metadata=meta)
    assert r["status"] == "valid", r.get("error")
    assert r["inputs"][0]["shape"] == [1, 7] and r["inputs"][0]["range"] == [0, 50]


def test_run_under_minimum_is_invalid_not_dropped(shared_agent, tiny_onnx):
    r = run_job(shared_agent.client(), tiny_onnx, {"runs": 10**6, "min_seconds": 5.0, "max_seconds": 0.1})
    assert r["state"] == "done" and r["status"] == "invalid"
    assert any("minimum is 1000000" in x for x in r["invalid_reasons"])
    assert any("shorter than the minimum" in x for x in r["invalid_reasons"])
    assert len(r["latency_ms"]["raw"]) == min(r["latency_ms"]["n"], MAX_RAW_LATENCIES) > 0  # every run, up to the cap


def test_a_runtime_the_export_rules_out_fails_the_job_before_it_loads(shared_agent, tiny_tflite, tiny_onnx):
    """FILE.json's runtime_min, held against the board's runtime: a runtime the export names as unable to run the
    file (tflite-runtime 2.14 computes hybrid INT8 and INT4 files wrongly) or older than its minimum fails the job with
    what to install, instead of timing a computation that is not the model's; older than the tested release warns.
    The runtimes are real; the FILE.json entries are written for this machine's versions, which can run both files."""
    pytest.importorskip("ai_edge_litert")
    from edgeq.agent.runtimes import _version

    litert, ort = _version("ai-edge-litert"), _version("onnxruntime")
    client = shared_agent.client()

    def meta(path, **runtime_min):
        return {"sha256": sha256_file(path), "variant": "int4", "runtime_min": runtime_min}

    r = run_job(client, tiny_tflite, metadata=meta(tiny_tflite, **{
        "ai-edge-litert": None, "tflite-runtime": "2.14 (tested)", "note": "its INT4 kernels give wrong results"}))
    assert r["status"] == "failed" and r["error"] == (
        f"runtime: ai-edge-litert {litert} cannot run this int4 file (its FILE.json runtime_min: its INT4 kernels "
        "give wrong results); install tflite-runtime 2.14 (tested) on the board"), r
    r = run_job(client, tiny_onnx, metadata=meta(tiny_onnx, onnxruntime="99.1"))
    assert r["status"] == "failed" and r["error"] == (f"runtime: onnxruntime {ort} is older than 99.1, which this int4 "
                                                       "file needs (its FILE.json runtime_min); pip install -U "
                                                       "onnxruntime on the board")
    r = run_job(client, tiny_onnx, metadata=meta(tiny_onnx, onnxruntime="99.1 (tested)"))
    assert r["status"] == "valid" and any("older than 99.1, the release" in w for w in r["warnings"]), r["warnings"]
    r = run_job(client, tiny_tflite, metadata=meta(tiny_tflite, **{"ai-edge-litert": "2.3 (tested)", "tflite-runtime": None}))
    assert r["status"] == "valid" and not [w for w in r["warnings"] if "runtime_min" in w], r.get("error")
    # a FILE.json written for other bytes says nothing about these
    r = run_job(client, tiny_onnx, metadata={**meta(tiny_onnx, onnxruntime="99.1"), "sha256": "0" * 64})
    assert r["status"] == "valid", r.get("error")


def test_more_threads_than_cpus_is_a_warning(shared_agent, tiny_onnx):
    """Threads beyond the CPUs the job may run on share cores: the result says so (the run stays valid)."""
    cpus = len(os.sched_getaffinity(0))
    r = run_job(shared_agent.client(), tiny_onnx, {"threads": cpus + 2})
    assert r["status"] == "valid" and r["threads"] == cpus + 2
    assert f"threads {cpus + 2} exceed the {cpus} CPUs this job may run on" in " ".join(r["warnings"]), r["warnings"]
    r = run_job(shared_agent.client(), tiny_onnx, {"threads": cpus})
    assert not [w for w in r["warnings"] if "exceed" in w]


def test_a_result_digests_what_the_board_computed(shared_agent, tiny_onnx, two_signature_tflite):
    """After the timed runs the board runs the file once more and sends back a digest of its outputs (sampled values,
    each row's argmax, the inputs' hash); this host, running the same file on the inputs remade from the seed, gets the
    same digest: `output_check` agrees. The file's ONNX graph and a TFLite signature (outputs in name order)."""
    import threading

    from edgeq.agent import host, outputs

    for path, config in ((tiny_onnx, {}), (two_signature_tflite, {"signature": "decode"})):
        if path.suffix == ".tflite":
            pytest.importorskip("ai_edge_litert")
        r = run_job(shared_agent.client(), path, config)
        assert r["status"] == "valid", r.get("error")
        out = r["outputs"]
        assert len(out["inputs_sha256"]) == 64 and out["tensors"], out
        for t in out["tensors"]:
            assert len(t["sample"]) == min(t["size"], out["per_tensor_sample"]) and t["nonfinite"] == 0
        check = outputs.output_check(path, host.bundle(path).sha256, r, {}, threading.Lock())
        assert check["compared"] and check["agrees"] and check["max_abs"] == 0.0, check
        assert check["reference"].endswith("on this host") and not check["not_compared"]


def test_output_digests_compare_values_rows_and_inputs():
    """`compare` of two digests: the same outputs agree; a sampled value moved, rows whose largest entry moved, a
    value that is not finite on one side or other inputs are each told apart."""
    from edgeq.agent.outputs import compare, digest

    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 8)).astype(np.float32)}
    logits = rng.standard_normal((1, 64, 50)).astype(np.float32)
    same = compare(digest([("logits", logits)], feeds), digest([("logits", logits.copy())], feeds))
    assert same["agrees"] and same["cos_min"] == pytest.approx(1.0) and same["argmax_agree"] == 1.0
    noisy = compare(digest([("logits", logits)], feeds), digest([("logits", -logits)], feeds))
    assert not noisy["agrees"] and noisy["cos_min"] == pytest.approx(-1.0) and noisy["argmax_agree"] < 0.1
    nan = logits.copy()
    nan[0, 0, 0] = np.nan
    told = compare(digest([("logits", logits)], feeds), digest([("logits", nan)], feeds))
    assert not told["agrees"] and told["nonfinite_differ"] == ["logits"]
    other = compare(digest([("logits", logits)], feeds), digest([("logits", logits)], {"x": feeds["x"] + 1}))
    assert other == {"compared": False, "why": other["why"]} and "other inputs" in other["why"]


def test_tflite_uses_xnnpack(shared_agent, tiny_tflite):
    pytest.importorskip("ai_edge_litert")
    r = run_job(shared_agent.client(), tiny_tflite)
    assert r["status"] == "valid", r.get("error")
    assert r["runtime"]["name"] == "litert" and r["runtime"]["provider"] == "XNNPACK delegate"
    # what this runtime's XNNPACK took, read from the interpreter on the agent: the whole graph, one partition
    assert r["runtime"]["xnnpack"] == {"nodes": 1, "partitions": 1, "builtin": {}}
    assert not any("XNNPACK" in w for w in r["warnings"])
    assert r["inputs"][0]["shape"] == [1, 16]
    # export metadata names signature inputs (`args_0`), not tensor names (`serving_default_args_0:0`)
    meta = {"inputs": [{"name": "args_0", "dtype": "float32", "shape": ["batch", 16]}]}
    r = run_job(shared_agent.client(), tiny_tflite, metadata=meta)
    assert r["status"] == "valid", r.get("error")
    assert r["inputs"][0]["name"] == "args_0" and r["inputs"][0]["from"] == "metadata"


def test_tflite_named_signature(shared_agent, two_signature_tflite, tiny_onnx):
    """`config.signature` times one signature of a multi-signature file (a decoder LM's `decode` step)
    through LiteRT's signature runner; a name the file lacks, or a signature on ONNX, fails the job by name."""
    pytest.importorskip("ai_edge_litert")
    from edgeq.export.tflite_runtime import xnnpack_coverage

    client = shared_agent.client()
    r = run_job(client, two_signature_tflite)
    assert r["status"] == "valid" and r["signature"] is None and [i["shape"] for i in r["inputs"]] == [[1, 16]]
    meta = {"inputs": [{"name": "args_0", "dtype": "float32", "shape": [1, 4]},
                       {"name": "args_1", "dtype": "int32", "shape": [1], "range": [7, 7]}]}
    r = run_job(client, two_signature_tflite, {"signature": "decode"}, metadata=meta)
    assert r["status"] == "valid", r.get("error")
    assert r["signature"] == "decode" and r["latency_ms"]["n"] > 0
    assert [(i["name"], i["shape"]) for i in r["inputs"]] == [("args_0", [1, 4]), ("args_1", [1])]
    # the interpreter lists its first subgraph's nodes only: the decode subgraph's come from loading it alone
    assert r["runtime"]["xnnpack"] == xnnpack_coverage(two_signature_tflite.read_bytes(), "decode")
    assert r["runtime"]["xnnpack"]["builtin"] == {"CAST": 1}  # the step's int32 -> float cast, not the first subgraph
    assert "loaded alone" in r["runtime"]["xnnpack_note"]
    r = run_job(client, two_signature_tflite, {"signature": "serving_default"})  # the first subgraph, by name
    assert r["runtime"]["xnnpack"]["partitions"] == 1
    r = run_job(client, two_signature_tflite, {"signature": "decode"})  # no metadata: the signature's own inputs
    assert r["status"] == "valid" and r["inputs"][1]["dtype"] == "int32" and r["inputs"][1]["from"] == "model signature"
    r = run_job(client, two_signature_tflite, {"signature": "prefill"})
    assert r["state"] == "failed" and "'prefill' is not one of the file's: decode, serving_default" in r["error"]
    r = run_job(client, tiny_onnx, {"signature": "decode"})
    assert r["state"] == "failed" and "applies to .tflite files" in r["error"]
    with pytest.raises(AgentError, match="config.signature"):
        run_job(client, two_signature_tflite, {"signature": "../decode"})


def test_ops_xnnpack_leaves_are_a_warning(shared_agent, int16x8_tflite):
    """A layer this runtime's XNNPACK has no kernel for (here 16x8: int16 activations, int8 weights) still runs, on
    LiteRT's slower built-in kernels: the result says which, measured on the agent, and warns."""
    pytest.importorskip("ai_edge_litert")
    from edgeq.export.tflite_runtime import xnnpack_coverage

    r = run_job(shared_agent.client(), int16x8_tflite)
    assert r["status"] == "valid", r.get("error")
    coverage = r["runtime"]["xnnpack"]
    assert coverage["builtin"].get("FULLY_CONNECTED") == 1, coverage
    assert coverage == xnnpack_coverage(int16x8_tflite.read_bytes(), "serving_default")  # the export's own check agrees
    assert "XNNPACK in this runtime left 1 FULLY_CONNECTED to LiteRT's built-in kernels" in r["warnings"]


def test_signature_inputs_are_set_once(two_signature_tflite):
    """A named signature is timed like a file's first subgraph: its inputs are set once when the job prepares, and
    each run invokes and reads the outputs, so a decode step's megabytes of caches are not copied in per run."""
    pytest.importorskip("ai_edge_litert")
    import numpy as np

    from edgeq.agent.runtimes import load

    model = load(two_signature_tflite, 1, "decode")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    model.prepare({"args_0": x, "args_1": np.array([7], dtype=np.int32)})
    assert model._signature_io is not None
    model.run()
    wrapper, subgraph, outputs = model._signature_io
    np.testing.assert_array_equal(wrapper.GetTensor(outputs[0], subgraph), x * 2 + 7)


def test_weight_cache_job(shared_agent, two_signature_tflite, tiny_onnx):
    """`config.weight_cache` times the signature through LiteRT's CompiledModel with XNNPACK's in-memory weight cache,
    and says so in the result's runtime; it is refused on ONNX and must be a bool."""
    pytest.importorskip("ai_edge_litert.compiled_model")
    client = shared_agent.client()
    r = run_job(client, two_signature_tflite, {"signature": "decode", "weight_cache": True})
    assert r["status"] == "valid", r.get("error")
    assert r["runtime"]["name"] == "litert-compiledmodel" and r["runtime"]["provider"].startswith("XNNPACK delegate")
    assert [(i["name"], i["shape"]) for i in r["inputs"]] == [("args_0", [1, 4]), ("args_1", [1])]
    r = run_job(client, two_signature_tflite, {"weight_cache": True})  # no signature: the file's first
    assert r["status"] == "valid" and [i["shape"] for i in r["inputs"]] == [[1, 16]]
    r = run_job(client, tiny_onnx, {"weight_cache": True})
    assert r["state"] == "failed" and "weight_cache: applies to .tflite files" in r["error"]
    with pytest.raises(AgentError, match="config.weight_cache"):
        run_job(client, two_signature_tflite, {"weight_cache": "yes"})


def test_weight_cache_runs_what_the_interpreter_runs(two_signature_tflite):
    """The same signature, the same inputs: CompiledModel with the weight cache gives the Interpreter's outputs, and a
    feed of the wrong shape on a static axis is refused by both (a CompiledModel buffer would take a shorter array as
    a prefix, silently)."""
    pytest.importorskip("ai_edge_litert.compiled_model")
    from edgeq.agent.runtimes import load

    feeds = {"args_0": np.arange(4, dtype=np.float32).reshape(1, 4), "args_1": np.array([7], dtype=np.int32)}
    interpreter, cached = load(two_signature_tflite, 1, "decode"), load(two_signature_tflite, 1, "decode", weight_cache=True)
    assert cached.signature() == interpreter.signature()
    for model in (interpreter, cached):
        model.prepare(feeds)
        model.run()
    wrapper, subgraph, outputs = interpreter._signature_io
    expected = wrapper.GetTensor(outputs[0], subgraph)
    np.testing.assert_array_equal(expected, feeds["args_0"] * 2 + 7)
    np.testing.assert_array_equal(cached._outputs[0].read(4, np.float32), expected.reshape(-1))
    for model in (interpreter, cached):  # neither resizes an axis the file declares static
        with pytest.raises(EdgeqError, match=r"args_0 is float32\[1, 2\]; the signature takes float32\[1, 4\]"):
            model.prepare({**feeds, "args_0": feeds["args_0"][:, :2].copy()})
    with pytest.raises(EdgeqError, match="'prefill' is not one of the file's"):
        load(two_signature_tflite, 1, "prefill", weight_cache=True)


_RSS_PROBE = """
import sys
from pathlib import Path
import numpy as np
from edgeq.agent.runtimes import load

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024

def loaded(path, signature):
    model = load(Path(path), 1, signature, weight_cache=sys.argv[3] == "1")
    model.prepare({s["name"]: np.ones(s["shape"], dtype=s["dtype"]) for s in model.signature()})
    model.run()
    return model

small = loaded(sys.argv[2], "decode")  # the runtime's own libraries and set-up, before the baseline (kept loaded)
before = rss()
model = loaded(sys.argv[1], "decode")
print(rss() - before)
"""


def test_weight_cache_packs_a_shared_weight_once(shared_weight_tflite, two_signature_tflite):
    """A job timing one signature of a file whose two signatures read one 16 MB weight: the Interpreter packs the
    weight for every subgraph when it loads, the weight cache packs it once. Resident memory grown by load and one run,
    each way in a fresh process (what the agent's job process would hold)."""
    pytest.importorskip("ai_edge_litert.compiled_model")
    import subprocess
    import sys

    def grown(weight_cache: bool) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(shared_weight_tflite), str(two_signature_tflite),
                              str(int(weight_cache))],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    weight = 2048 * 2048 * 4
    interpreter, cached = grown(False), grown(True)
    assert interpreter - cached > weight // 2, (interpreter, cached)


def test_a_signature_written_alone_runs_as_in_its_file(tmp_path, shared_weight_tflite):
    """How the agent reads a `decode` signature's XNNPACK coverage: the signature's subgraph written alone, its
    weights after the flatbuffer by offset (not copied into it), runs as the same signature of the whole file."""
    pytest.importorskip("ai_edge_litert")
    from edgeq.export.tflite_flatbuffer import read_model, write_signature_alone
    from edgeq.export.tflite_runtime import TfliteRunner

    buf = shared_weight_tflite.read_bytes()
    assert not write_signature_alone(buf, "serving_default", tmp_path / "first.tflite")  # already the first subgraph
    assert not (tmp_path / "first.tflite").exists()
    assert write_signature_alone(buf, "decode", tmp_path / "decode.tflite")
    alone = (tmp_path / "decode.tflite").read_bytes()
    model_t = read_model(alone)
    assert len(model_t.subgraphs) == 1 and [d.signatureKey for d in model_t.signatureDefs] == [b"decode"]
    assert max(b.size for b in model_t.buffers) == 2048 * 2048 * 4  # the weight, once, past the flatbuffer
    assert all(b.data is None for b in model_t.buffers) and len(alone) < len(buf) + 4096
    x = np.random.default_rng(0).standard_normal((1, 2048)).astype(np.float32)
    want = TfliteRunner(shared_weight_tflite, signature="decode")(x)[0]
    np.testing.assert_array_equal(TfliteRunner(tmp_path / "decode.tflite")(x)[0], want)


def test_job_meta_takes_the_signatures_inputs():
    from edgeq.agent.host import job_meta

    meta = {"format": "tflite", "inputs": [{"name": "args_0"}], "signatures": {"decode": {"inputs": [{"name": "args_1"}]}}}
    assert job_meta(meta, None) is meta
    assert job_meta(meta, "decode")["inputs"] == [{"name": "args_1"}]
    assert job_meta(meta, "other")["inputs"] is None and job_meta(None, "decode") is None


def _malformed(tmp: Path, tiny_onnx: Path) -> list[Path]:
    from onnx import TensorProto, helper

    good = tiny_onnx.read_bytes()
    rng = np.random.default_rng(0)
    out = []

    def put(name, data):
        p = tmp / name
        p.write_bytes(data)
        out.append(p)

    put("truncated.onnx", good[: len(good) // 2])
    put("empty.onnx", b"")
    put("random.onnx", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    fuzzed = bytearray(good)
    fuzzed[2:40] = rng.integers(0, 256, 38, dtype=np.uint8).tobytes()
    put("fuzzed.onnx", bytes(fuzzed))
    put("varint.onnx", b"\x3a" + b"\xff" * 11)
    huge = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40, 2**40], raw_data=b"\0" * 16)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [huge])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    put("absurd_tensor.onnx", m.SerializeToString())
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2**31, 2**31])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    put("absurd_input.onnx", m.SerializeToString())
    put("random.tflite", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("bad_flatbuffer.tflite", b"\x1c\x00\x00\x00TFL3" + b"\xff" * 200)
    put("truncated.tflite", b"\x10\x00\x00\x00TFL3\x00\x00")
    return out


def test_ten_malformed_models_fail_cleanly(shared_agent, tiny_onnx, tmp_path):
    client = shared_agent.client()
    models = _malformed(tmp_path, tiny_onnx)
    assert len(models) == 10
    for model in models:
        r = run_job(client, model)
        assert r["state"] == "failed" and r["status"] == "failed", (model.name, r.get("status"))
        assert r["error"], model.name
    assert run_job(client, tiny_onnx)["status"] == "valid"  # still serving and measuring


def _external_with_location(tmp: Path, location: str) -> tuple[Path, Path]:
    import onnx

    model = make_onnx(tmp / "ext.onnx", external="weights.bin")
    proto = onnx.load(str(model), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    bad = tmp / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    return bad, tmp / "weights.bin"


def test_external_data_inside_job_dir_works(shared_agent, tmp_path):
    model = make_onnx(tmp_path / "ext.onnx", external="weights.bin")
    assert external_locations(model) == ["weights.bin"]
    r = run_job(shared_agent.client(), model, files=[tmp_path / "weights.bin"])
    assert r["status"] == "valid", r.get("error")
    assert r["size_bytes"] == model.stat().st_size + (tmp_path / "weights.bin").stat().st_size


@pytest.mark.parametrize("location,expect", [("../weights.bin", "leaves the job directory"),
                                             ("/etc/hostname", "absolute location"),
                                             ("sub/../../weights.bin", "leaves the job directory")])
def test_external_data_outside_job_dir_refused(shared_agent, tmp_path, location, expect):
    bad, weights = _external_with_location(tmp_path, location)
    r = run_job(shared_agent.client(), bad, files=[weights])
    assert r["status"] == "failed" and expect in r["error"]
    assert r["artifact_sha256"] == sha256_file(bad)  # a failed result names its file, as a measured one does


def test_external_data_symlink_refused(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    bad, weights = _external_with_location(tmp_path, "link.bin")
    os.replace(bad, job / "bad.onnx")
    (job / "link.bin").symlink_to(weights)
    with pytest.raises(EdgeqError, match="symlink"):
        check_external_data(job / "bad.onnx", job)
    (job / "link.bin").unlink()
    (job / "link.bin").symlink_to("/etc/hostname")
    with pytest.raises(EdgeqError, match="symlink"):
        check_external_data(job / "bad.onnx", job)


def test_memory_limit(shared_agent, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [256, 1024, 1024])  # 1 GiB of float
    g = helper.make_graph([helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                           helper.make_node("Add", ["big", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "big.onnx"))
    r = run_job(shared_agent.client(), tmp_path / "big.onnx", {"memory_mb": 600})
    assert r["status"] == "failed" and "memory limit" in r["error"], r["error"]


def test_a_killed_runner_says_what_the_signal_tells():
    """A crash is not blamed on a limit it did not hit: tflite-runtime 2.14 died of SIGSEGV on an INT4 file (measured
    on a board venv of it), which the message called "memory limit or CPU limit"."""
    import signal

    from edgeq.agent.jobs import killed_by

    segv = killed_by(signal.SIGSEGV, 600, 901)
    assert segv.startswith("the runner was killed by SIGSEGV: the runtime crashed on this file") and "600 MB" in segv
    assert killed_by(signal.SIGXCPU, 600, 901).endswith("(the job's CPU-time limit, 901 s)")
    assert "out-of-memory killer" in killed_by(signal.SIGKILL, 600, 901)
    assert killed_by(signal.SIGTERM, 600, 901) == "the runner was killed by SIGTERM"


def test_time_limit(shared_agent, tiny_onnx):
    r = run_job(shared_agent.client(), tiny_onnx, {"timeout_s": 1.5, "min_seconds": 60, "max_seconds": 120})
    assert r["status"] == "failed" and "time limit exceeded" in r["error"]
    assert r["artifact_sha256"] == sha256_file(tiny_onnx)  # also when the runner was killed and wrote nothing
    assert run_job(shared_agent.client(), tiny_onnx)["status"] == "valid"


def test_power_through_the_runner_on_recorded_jetson_tree(agent_factory, tiny_onnx):
    tree = Path(__file__).parent / "fixtures" / "sysfs" / "jetson-orin-nx"
    agent = agent_factory(["--power-meter", "auto", "--sysfs-root", str(tree)])
    assert agent.client().info()["power_meter"]["meter"] == "jetson-ina3221"
    r = run_job(agent.client(), tiny_onnx, {"min_seconds": 0.3})
    p = r["power"]
    assert p["meter"] == "jetson-ina3221" and p["reason"] is None, p
    assert p["mean_w"] == pytest.approx(5072 * 1456 / 1e6)
    n, seconds = r["latency_ms"]["n"], r["latency_ms"]["seconds"]
    assert p["energy_per_inference_mj"] == pytest.approx(p["mean_w"] * seconds / n * 1e3, rel=1e-6)
    assert p["energy_per_inference_net_mj"] == pytest.approx(0.0, abs=1e-9)  # constant: idle == busy
    assert p["baseline_s"] >= 0.3 and p["samples"] >= 5 and p["rate_hz"] == 20.0


def test_power_from_external_command(agent_factory, tiny_onnx):
    import sys

    cmd = f"command:{sys.executable} -c \"import random; print(2.5 + random.random() * 0.01)\""
    agent = agent_factory(["--power-meter", cmd])
    r = run_job(agent.client(), tiny_onnx, {"min_seconds": 0.3})
    assert r["power"]["meter"] == "command" and r["power"]["mean_w"] == pytest.approx(2.505, abs=0.01)
    r = run_job(agent.client(), tiny_onnx, {"power": False})
    assert r["power"]["mean_w"] is None and "not requested" in r["power"]["reason"]


def test_input_dim_defaults_size_a_symbolic_dim_unless_the_job_does():
    """A metadata input's `dim_defaults` (a decode step's declared cache slots) sizes its symbolic dim; the job's
    `dims` win over it; a default that is no size is ignored (then the names' rules apply)."""
    from edgeq.agent.inputs import make_inputs

    spec = [{"name": "mask", "dtype": "float32", "shape": [1, 1, "slots"], "dim_defaults": {"slots": 32}},
            {"name": "ids", "dtype": "int32", "shape": [1, "sequence"], "dim_defaults": {"slots": 32}}]
    feeds, record = make_inputs(spec, {}, 0)
    assert feeds["mask"].shape == (1, 1, 32) and record[0]["dims"] == {"slots": 32} and feeds["ids"].shape == (1, 64)
    feeds, record = make_inputs(spec, {"slots": 8}, 0)
    assert feeds["mask"].shape == (1, 1, 8) and record[0]["dims"] == {"slots": 8}
    feeds, _ = make_inputs([{**spec[0], "dim_defaults": {"slots": 0}}], {}, 0)
    assert feeds["mask"].shape == (1, 1, 64)
    caches = [{"name": f"k_{i}", "dtype": "float32", "shape": [64, "slots", 64]} for i in range(60)]
    with pytest.raises(EdgeqError, match=r"the 60 inputs would need 3\.8 GiB together"):  # before any is made
        make_inputs(caches, {"slots": 4096}, 0)
