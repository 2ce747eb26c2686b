"""Host side: `edgeq profile`, `edgeq results`, the devices file, the store, and import hygiene."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq import store
from edgeq.agent import host
from edgeq.cli.main import main
from edgeq.errors import EdgeqError
from edgeq.fileio import sha256_file, write_json_atomic

from .conftest import make_token_onnx

FAST_ARGS = ["--runs", "10", "--min-seconds", "0.05"]
FAST_CONFIG = {"runs": 10, "min_seconds": 0.05}


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_profile_local_stores_results_tied_to_export_json(tmp_path, capsys, tiny_onnx):
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    meta = {"format": "onnx", "variant": "w8a8", "sha256": sha256_file(model),
            "source": {"model": "tiny", "qdir": "q", "quant_json_sha256": "c" * 64},
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", "sequence", 16]}]}
    write_json_atomic(tmp_path / "tiny.onnx.json", meta)
    tok = make_token_onnx(tmp_path / "tok.onnx")
    db = tmp_path / "r.sqlite"
    code, out, err = cli(capsys, "profile", str(model), str(tok), "--local", "--db", str(db), "--json",
                         "--dim", "sequence=8", *FAST_ARGS)
    assert code == 0, err
    summaries = json.loads(out)
    assert [s["status"] for s in summaries] == ["valid", "valid"]
    assert summaries[0]["result"]["inputs"][0]["shape"] == [1, 8, 16]
    rows = store.list_results(db)
    assert len(rows) == 2
    row = next(r for r in rows if r.artifact_sha256 == meta["sha256"])
    assert row.variant == "w8a8" and row.quant_json_sha256 == "c" * 64 and row.model_ref == "tiny"
    assert row.export_json == meta and row.fingerprint["python"] and row.fingerprint_sha256
    assert row.n_runs == len(row.result["latency_ms"]["raw"]) and row.p50_ms > 0

    code, out, _ = cli(capsys, "results", "list", "--db", str(db), "--json")
    assert code == 0 and len(json.loads(out)) == 2
    code, out, _ = cli(capsys, "results", "show", str(row.id), "--db", str(db), "--json")
    assert code == 0 and json.loads(out)["artifact_sha256"] == meta["sha256"]
    code, out, _ = cli(capsys, "results", "list", "--db", str(db))
    assert "w8a8" in out and "valid" in out
    # a URL device and a long runtime name read whole (they were cut to 12 characters)
    result = {**row.result, "runtime": {**row.result["runtime"], "name": "litert-compiledmodel"}}
    store.record_result(db, result, device="http://192.168.1.23:8765", device_url="http://192.168.1.23:8765",
                        artifact_path=row.artifact_path, export_meta=meta)
    code, out, _ = cli(capsys, "results", "list", "--db", str(db))
    newest = out.splitlines()[1]
    assert " http://192.168.1.23:8765 " in newest and " litert-compiledmodel " in newest, out
    code, _, err = cli(capsys, "results", "show", "999", "--db", str(db))
    assert code == 2 and "999" in err


def test_a_file_the_board_cannot_run_is_stored_as_failed_beside_the_others(tmp_path, capsys, tiny_onnx):
    """A job that fails on the board (a damaged file) is a result too: stored as failed, tied to the file that was
    sent, and the files after it in the run are measured and stored. Before, its result carried no artifact hash, the
    store refused it, and the command ended on that error with nothing stored."""
    import onnx
    from onnx import TensorProto, helper

    bad = tmp_path / "bad.onnx"  # reads as ONNX on this host; the board's runtime has no such op
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    db = tmp_path / "r.sqlite"
    code, out, err = cli(capsys, "profile", str(bad), str(tiny_onnx), "--local", "--db", str(db), "--json", *FAST_ARGS)
    assert code == 1, err
    assert [s["status"] for s in json.loads(out)] == ["failed", "valid"]
    rows = {r.artifact_sha256: r for r in store.list_results(db)}
    assert rows[sha256_file(bad)].status == "failed" and rows[sha256_file(tiny_onnx)].status == "valid"
    assert "NoSuchOp" in rows[sha256_file(bad)].result["error"]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("hello")  # refused on this host before anything is sent
    code, _, err = cli(capsys, "profile", str(garbage), "--local", "--db", str(db))
    assert code == 2 and err.strip() == f"edgeq: error: artifact: {garbage} is not a readable ONNX model (ONNX: unsupported wire type 4)"


def test_a_database_that_cannot_take_the_result_is_refused_before_the_run(tmp_path, capsys, tiny_onnx):
    """`--db` naming a file that is not a results database ends the command before any board time is spent (the run
    used to finish first, and its result was lost when it could not be stored); the file is left as it was."""
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database")
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--local", "--db", str(bad), *FAST_ARGS)
    assert code == 2 and err == f"edgeq: error: db: {bad}: file is not a database\n" and not out
    code, out, err = cli(capsys, "eval", str(tiny_onnx), "--db", str(bad))
    assert code == 2 and err == f"edgeq: error: db: {bad}: file is not a database\n" and not out
    assert bad.read_text() == "not a database"


def test_profile_two_devices_in_parallel_via_devices_file(tmp_path, capsys, agent_factory, tiny_onnx,
                                                          monkeypatch):
    a, b = agent_factory(name="a"), agent_factory(name="b")
    devices = tmp_path / "devices.toml"
    devices.write_text(f'[devices.board-a]\nurl = "{a.url}"\ntoken_file = "{a.token_file}"\n\n'
                       f'[devices.board-b]\nurl = "{b.url}"\ntoken_file = "{b.token_file}"\n')
    db = tmp_path / "env.sqlite"
    monkeypatch.setenv("EDGEQ_DB", str(db))
    monkeypatch.setenv("EDGEQ_DEVICES", str(devices))
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--device", "board-a", "--device", "board-b", *FAST_ARGS)
    assert code == 0, out + err
    assert "[board-a]" in err and "[board-b]" in err  # live progress
    assert {r.device for r in store.list_results()} == {"board-a", "board-b"}
    # a URL device with --token-file
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--device", a.url, "--token-file", str(a.token_file),
                         *FAST_ARGS)
    assert code == 0, err
    assert len(store.list_results(device=a.url)) == 1


def test_devices_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    """A devices file beside its token reads it wherever edgeq runs; `~` and absolute paths stay as they are."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "devices.toml").write_text('[devices.pi5]\nurl = "https://pi5.local:8765"\ntoken_file = "pi5.token"\n'
                                       'ca_file = "~/ca.pem"\nclient_cert = "/etc/edgeq/host.pem"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dev = host.load_devices(conf / "devices.toml")["pi5"]
    assert (dev.token_file, dev.ca_file, dev.client_cert, dev.client_key) == \
        (str(conf / "pi5.token"), str(tmp_path / "home" / "ca.pem"), "/etc/edgeq/host.pem", None)


def test_profile_tells_a_board_that_computes_something_else(tmp_path, capsys, tiny_onnx, monkeypatch):
    """`profile` compares each board's outputs with this host's run of the file on the same inputs: the table says
    `same`, or `DIFFER` with a warning naming the host's runtime (here the host's reference is made to compute the
    negated outputs: this machine has no board whose runtime computes wrongly; tflite-runtime 2.14's hybrid kernels
    are one, per the export's runtime_min). `--no-output-check` leaves the column empty."""
    db = tmp_path / "r.sqlite"
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--local", "--db", str(db), *FAST_ARGS)
    header, row = out.splitlines()[:2]
    assert code == 0 and header.endswith("outputs vs host") and row.endswith(" same"), out
    from edgeq.agent import outputs

    real = outputs.host_digest

    def negated(b, result):
        ref = real(b, result)
        tensors = [{**t, "sample": [-v for v in t["sample"]]} for t in ref["digest"]["tensors"]]
        return {**ref, "digest": {**ref["digest"], "tensors": tensors}}

    monkeypatch.setattr(outputs, "host_digest", negated)
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--local", "--db", str(db), *FAST_ARGS)
    assert out.splitlines()[1].endswith(" DIFFER"), out
    assert "local tiny.onnx: warning: its outputs differ from onnxruntime " in out and "cosine -1.0000" in out
    stored = store.list_results(db)[0].result["output_check"]
    assert stored["compared"] and not stored["agrees"]
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--local", "--db", str(db), "--no-output-check", *FAST_ARGS)
    assert out.splitlines()[1].endswith(" -") and "output_check" not in store.list_results(db)[0].result


def test_a_file_the_boards_runtime_cannot_run_is_not_uploaded(tmp_path, agent_factory, tiny_tflite):
    """Before uploading, the host holds each file's FILE.json runtime_min against the runtime the agent's /v1/info
    names (the rule the agent applies before loading): a ruled-out file is stored as failed, saying so, and never sent.
    The FILE.json here rules out this machine's ai-edge-litert, which does run the file: the rule is what is tested."""
    pytest.importorskip("ai_edge_litert")
    from edgeq.agent.fingerprint import runtime_versions
    from edgeq.agent.protocol import check_config

    a = agent_factory()
    f = tmp_path / "w4.tflite"
    f.write_bytes(tiny_tflite.read_bytes())
    write_json_atomic(tmp_path / "w4.tflite.json", {
        "format": "tflite", "variant": "int4", "sha256": sha256_file(f),
        "runtime_min": {"ai-edge-litert": None, "tflite-runtime": "2.14 (tested)", "note": "wrong results"}})
    db = tmp_path / "r.sqlite"
    (s,) = host.profile([f], [host.Device(a.url, a.url, str(a.token_file))], check_config(FAST_CONFIG), str(db))
    litert = runtime_versions()["ai-edge-litert"]
    assert s["status"] == "failed" and s["error"] == (
        f"runtime: ai-edge-litert {litert} cannot run this int4 file (its FILE.json runtime_min: wrong results); "
        f"install tflite-runtime 2.14 (tested) on the board (not sent: the agent's /v1/info names ai-edge-litert {litert})")
    assert not a.client().has_artifact(sha256_file(f))
    (row,) = store.list_results(db)
    assert row.status == "failed" and row.fingerprint["runtimes"]["ai-edge-litert"] == litert


def test_agent_info_says_what_a_board_runs(tmp_path, capsys, agent_factory):
    """`edgeq agent info --device`: the agent's versions, runtimes, power meter and limits, by URL or by name from the
    devices file; an agent that refuses the token or cannot be reached is an error line and exit 1."""
    from edgeq.agent.fingerprint import runtime_versions

    a = agent_factory()
    code, out, err = cli(capsys, "agent", "info", "--device", a.url, "--token-file", str(a.token_file))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{a.url}: edgeq {runtime_versions()['edgeq']}, protocol 1"
    assert f"onnxruntime {runtime_versions()['onnxruntime']}" in lines[2] and lines[2].startswith("  runtimes: ")
    assert lines[3].startswith("  power:    none (power metering disabled")  # the test agents run --power-meter none
    devices = tmp_path / "devices.toml"
    devices.write_text(f'[devices.board]\nurl = "{a.url}"\ntoken_file = "{a.token_file}"\n')
    wrong = tmp_path / "wrong"
    wrong.write_text("w" * 32)
    code, out, _ = cli(capsys, "agent", "info", "--device", "board", "--device", "http://127.0.0.1:9", "--token-file",
                       str(wrong), "--devices-file", str(devices), "--json")
    answers = json.loads(out)
    assert code == 1 and [x["device"] for x in answers] == ["board", "http://127.0.0.1:9"]
    assert answers[0]["error"].endswith("401: wrong token") and "connection refused" in answers[1]["error"]
    code, out, _ = cli(capsys, "agent", "info", "--device", "board", "--devices-file", str(devices), "--json")
    assert code == 0 and json.loads(out)[0]["info"]["fingerprint"]["runtimes"] == runtime_versions()


def test_device_errors(tmp_path, capsys, tiny_onnx):
    devices = tmp_path / "devices.toml"
    devices.write_text('[devices.x]\nurl = "http://127.0.0.1:1"\npassword = "no"\n')
    with pytest.raises(EdgeqError, match="allows only"):
        host.load_devices(devices)
    devices.write_text('[devices.x]\nurl = "http://127.0.0.1:9"\n')
    code, _, err = cli(capsys, "profile", str(tiny_onnx), "--device", "nope", "--devices-file", str(devices))
    assert code == 2 and "neither a URL nor a name" in err
    code, _, err = cli(capsys, "profile", str(tiny_onnx))
    assert code == 2 and "--device" in err
    token = tmp_path / "t"
    token.write_text("a" * 32)
    code, out, err = cli(capsys, "profile", str(tiny_onnx), "--device", "http://127.0.0.1:9", "--token-file",
                         str(token), "--db", str(tmp_path / "x.sqlite"))
    assert code == 1 and "connection refused" in out
    assert store.list_results(tmp_path / "x.sqlite") == []
    code, _, err = cli(capsys, "profile", str(tiny_onnx), "--local", "--signature", "decode")
    assert code == 2 and "--signature applies to .tflite files" in err
    code, _, err = cli(capsys, "profile", str(tiny_onnx), "--local", "--weight-cache")
    assert code == 2 and "--weight-cache applies to .tflite files" in err


def test_store_evals_and_validation(tmp_path):
    db = tmp_path / "s.sqlite"
    rid = store.record_eval(db, target_sha256="a" * 64, target_path="m.onnx", model_ref="tiny", task="ppl",
                            metrics={"ppl": 19.8}, data="enwiki:8k", meta={"windows": 16})
    rows = store.list_evals(db, target_sha256="a" * 8)
    assert rows[0].id == rid and rows[0].metrics == {"ppl": 19.8} and rows[0].meta == {"windows": 16}
    assert store.list_evals(db, task="top1") == []
    with pytest.raises(EdgeqError, match="status"):
        store.record_result(db, {"artifact_sha256": "a" * 64, "status": "done"}, device="d")
    with pytest.raises(EdgeqError, match="artifact_sha256"):
        store.record_result(db, {"status": "valid"}, device="d")
    assert store.resolve_db_path("x.sqlite") == Path("x.sqlite")


def test_agent_modules_import_no_heavy_packages():
    code = ("import sys\n"
            "import edgeq.agent.server, edgeq.agent.runner, edgeq.agent.meters, edgeq.agent.onnxcheck\n"
            "import edgeq.agent.runtimes, edgeq.cli.agent, edgeq.cli.main, edgeq.export.tflite_flatbuffer\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers', 'onnx', 'tensorflow', 'litert_torch'})\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_profile_weight_cache_is_its_own_runtime(tmp_path, capsys, two_signature_tflite):
    """`--weight-cache` reaches the agent, and the stored result names the runtime it ran on (a report keeps it apart
    from the Interpreter's result of the same file)."""
    pytest.importorskip("ai_edge_litert.compiled_model")
    db = tmp_path / "r.sqlite"
    for extra in ([], ["--weight-cache"]):
        code, out, err = cli(capsys, "profile", str(two_signature_tflite), "--local", "--db", str(db), "--json",
                             "--signature", "decode", *extra, *FAST_ARGS)
        assert code == 0, err
    runtimes = sorted(r.runtime for r in store.list_results(db))
    assert runtimes == ["litert", "litert-compiledmodel"]


def test_unknown_signature_is_refused_before_any_job(tmp_path, capsys, two_signature_tflite):
    """A --signature the file's FILE.json does not list stops the run in one line, before a board spends a job on the
    typo and the database gets a failed row; FILE.json written for other bytes is not trusted (the board judges)."""
    art = tmp_path / "two.tflite"
    art.write_bytes(two_signature_tflite.read_bytes())
    meta = {"format": "tflite", "sha256": sha256_file(art), "signatures": {"serving_default": {}, "decode": {}}}
    write_json_atomic(art.with_name(art.name + ".json"), meta)
    db = tmp_path / "r.sqlite"
    code, out, err = cli(capsys, "profile", str(art), "--local", "--db", str(db), "--signature", "decoder", *FAST_ARGS)
    assert code == 2 and err.strip() == ("edgeq: error: --signature: 'decoder' is not a signature of two.tflite "
                                         "(it has: decode, serving_default)")
    assert store.list_results(db) == []
    other_bytes = dataclasses.replace(host.bundle(art), sha256="0" * 64)
    host.check_signature(other_bytes, "decoder")  # no error: the metadata describes some other file
    code, _, err = cli(capsys, "profile", str(art), "--local", "--runs", "0")
    assert code == 2 and "'--runs': 0 is not in the range 1<=x<=1000000" in err
    code, _, err = cli(capsys, "profile", str(art), "--local", "--signature", "decode", "--dim", "slots=0")
    assert code == 2 and "--dim slots=0: a size is an integer in [1, 1048576]" in err


def test_profile_local_library_call_for_demo(tmp_path, tiny_onnx):
    db = tmp_path / "demo.sqlite"
    summaries = host.profile_local([tiny_onnx], db=db, runs=10, min_seconds=0.05)
    assert summaries[0]["status"] == "valid" and summaries[0]["row_id"] == store.list_results(db)[0].id
    table = host.summary_table(summaries)
    assert "tiny.onnx" in table and "valid" in table and "CPUExecutionProvider" in table
    # columns as wide as their cells: a URL device and a long runtime / provider read whole, aligned
    long = {**summaries[0], "device": "http://192.168.1.23:8765",
            "result": {**summaries[0]["result"], "runtime": {"name": "litert-compiledmodel",
                                                             "provider": "XNNPACK delegate (weight cache)"}}}
    header, *rows = host.summary_table([summaries[0], long]).splitlines()[:3]
    assert rows[1].startswith("http://192.168.1.23:8765 tiny.onnx ")
    assert "litert-compiledmodel / XNNPACK delegate (weight cache)" in rows[1]
    assert len({line.index(" tiny.onnx") for line in rows}) == 1 and header.index("artifact") == rows[0].index("tiny.onnx")


@pytest.mark.slow
def test_profile_decode_step_at_chosen_slots(tmp_path, capsys):
    """`edgeq profile --signature decode --dim slots=N` times an LM's decode step holding N cache slots (the runtime
    resizes the mask and caches, whose slot axis FILE.json names `slots`, default the declared count); the report
    keeps each slot count in its own column, compared with the fp32 file's step at the same count; the weight cache
    (CompiledModel) resizes too."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_quantizer")
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe
    from edgeq.report import compare
    from edgeq.report.gather import gather

    bundle = load_model("tiny-llama")
    qdir = quantize_model(bundle, load_recipe("w8"), calibration_batches(bundle, None, 4, 64)).save(tmp_path / "q")
    files = {"w8": tmp_path / "w8.tflite", "fp32": tmp_path / "fp32.tflite"}
    meta = export(qdir, "tflite", files["w8"], seq_len=32, cache_len=32)
    export("tiny-llama", "tflite", files["fp32"], seq_len=32, cache_len=32)
    decode = meta["signatures"]["decode"]["inputs"]
    assert decode[2]["shape"] == [1, 1, "slots"] and decode[3]["shape"][1] == decode[4]["shape"][2] == "slots"
    assert decode[3]["dim_defaults"] == {"slots": 32}
    db = tmp_path / "r.sqlite"
    for path in files.values():
        for dims in ([], ["--dim", "slots=8"]):
            code, _, err = cli(capsys, "profile", str(path), "--local", "--db", str(db), "--json", "--signature", "decode",
                               *dims, *FAST_ARGS)
            assert code == 0, err
    shapes = {(Path(r.artifact_path).stem, tuple(sorted(r.result["config"]["dims"].items()))): r.result["inputs"]
              for r in store.list_results(db)}
    for stem in files:
        assert shapes[(stem, ())][2]["shape"] == [1, 1, 32] and shapes[(stem, (("slots", 8),))][2]["shape"] == [1, 1, 8]
        assert shapes[(stem, (("slots", 8),))][3]["dims"] == {"slots": 8}
    columns = gather(db).columns
    assert len(columns) == 4
    small = next(c for c in columns if not c.is_fp32 and c.dims == (("slots", 8),))
    assert small.variant.endswith("[decode] [slots=8]")
    assert compare.baseline_for(small, columns).dims == (("slots", 8),)
    code, out, err = cli(capsys, "profile", str(files["w8"]), "--local", "--db", str(db), "--signature", "decode",
                         "--dim", "slots=8", *FAST_ARGS)
    assert code == 0 and "w8.tflite [decode] [slots=8]" in out, out
    code, out, err = cli(capsys, "profile", str(files["w8"]), "--local", "--db", str(db), "--signature", "decode",
                         "--weight-cache", "--dim", "slots=8", *FAST_ARGS)  # CompiledModel resizes too
    assert code == 0 and "w8.tflite [decode] [slots=8]" in out, out + err
    cached = next(r for r in store.list_results(db) if r.runtime == "litert-compiledmodel")
    assert cached.result["inputs"][2]["shape"] == [1, 1, 8]
    # the two runtimes, each resized to 8 slots, compute the same step from the same inputs
    from edgeq.agent.inputs import make_inputs
    from edgeq.agent.runtimes import load

    feeds, _ = make_inputs(decode, {"slots": 8}, 0)
    interpreter, compiled = load(files["w8"], 1, "decode"), load(files["w8"], 1, "decode", weight_cache=True)
    for model in (interpreter, compiled):
        model.prepare(feeds)
        model.run()
    wrapper, subgraph, outputs = interpreter._signature_io
    logits = wrapper.GetTensor(outputs[0], subgraph).reshape(-1)
    assert np.allclose(compiled._outputs[0].read(logits.size, np.float32), logits, atol=1e-5)


@pytest.mark.slow
def test_onnx_decode_graph_is_profiled_as_its_exports_decode_step(tmp_path, capsys):
    """FILE.decode.onnx has no JSON of its own: profiled, it takes its export's metadata from FILE.onnx.json (which lists
    its sha256), so the report puts it under its model as the variant's `[decode]` column, compared with the FP32
    export's decode graph, with the export's evaluated quality. Bytes the export does not list stay unknown. (Before,
    every ONNX decode graph, the demo's included, landed under "unknown model" with no FP32 to compare with.)"""
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe
    from edgeq.report import build_report

    bundle = load_model("tiny-llama")
    qdir = quantize_model(bundle, load_recipe("w8-tensor"), calibration_batches(bundle, None, 4, 64)).save(tmp_path / "q")
    export(qdir, "onnx", tmp_path / "w8.onnx")
    export("tiny-llama", "onnx", tmp_path / "fp32.onnx")
    db = tmp_path / "r.sqlite"
    code, _, err = cli(capsys, "profile", str(tmp_path / "w8.decode.onnx"), str(tmp_path / "fp32.decode.onnx"), "--local",
                       "--db", str(db), *FAST_ARGS)
    assert code == 0, err
    assert main(["eval", str(tmp_path / "w8.onnx"), "--count", "1", "--seq-len", "32", "--db", str(db)]) == 0
    (model,) = build_report(db)["models"]
    assert model["model"] == "tiny-llama"
    cols = {c["artifact_name"]: c for c in model["columns"]}
    w8, fp32 = cols["w8.decode.onnx"], cols["fp32.decode.onnx"]
    assert w8["label"] == "dynamic-int8 [decode] w8-tensor" and fp32["is_fp32"]
    assert w8["vs_fp32"]["baseline_id"] == fp32["id"] and w8["vs_fp32"]["speedup_p50"] is not None
    assert w8["quality"]["value"] == store.list_evals(db)[0].metrics["ppl"]
    assert w8["size"]["bytes"] == (tmp_path / "w8.decode.onnx").stat().st_size
    code, _, err = cli(capsys, "eval", str(tmp_path / "w8.decode.onnx"))
    assert code == 2 and "w8.decode.onnx is the one-token decode step of w8.onnx" in err
    meta = json.loads((tmp_path / "w8.onnx.json").read_text())
    for entry in meta["files"]:
        entry["sha256"] = "0" * 64  # the export listed other bytes under that name
    (tmp_path / "w8.onnx.json").write_text(json.dumps(meta))
    assert host.bundle(tmp_path / "w8.decode.onnx").meta is None
    capsys.readouterr()


def test_profile_dim_no_input_has_is_a_warning_not_a_label(tmp_path, capsys, two_signature_tflite):
    """A job dim that sizes no input (a file exported before its decode step named its slot axis) changes nothing:
    the result warns so, and the report does not name the column after it. `edgeq profile --dim` refuses such a dim
    before the run (tests/agent/test_client_errors.py); the library call `edgeq demo` makes still warns."""
    pytest.importorskip("ai_edge_litert")
    from edgeq.report.gather import gather

    db = tmp_path / "r.sqlite"
    code, out, err = cli(capsys, "profile", str(two_signature_tflite), "--local", "--db", str(db),
                         "--signature", "decode", "--dim", "slots=8", *FAST_ARGS)
    assert code == 2 and "--dim slots=8: no input of two_signatures.tflite [decode] has a dim of that name" in err
    summaries = host.profile_local([two_signature_tflite], db=db, runs=10, min_seconds=0.05, signature="decode",
                                   dims={"slots": 8})
    assert "two_signatures.tflite [decode]: warning: dims slots: no input" in host.summary_table(summaries)
    warnings = store.list_results(db)[0].result["warnings"]
    assert any(w.startswith("dims slots: no input") for w in warnings), warnings
    column = gather(db).columns[0]
    assert column.dims == () and column.variant.endswith("[decode]")
