"""The report from a database filled by REAL local profiling runs (conftest: a local agent on loopback)."""

from __future__ import annotations

import json

import pytest

from edgeq import store
from edgeq.cli.main import main
from edgeq.fileio import sha256_file
from edgeq.report import build_report, write_report
from edgeq.report.plots import no_fetches

from .conftest import MODEL, VARIANTS


@pytest.fixture
def doc_and_rows(profiled_db, artifacts):
    rows = store.list_results(profiled_db)
    by = {}
    for r in rows:
        name = r.artifact_path.rsplit("/", 1)[-1][:-5]
        by[(name, r.threads)] = r
    doc = build_report(profiled_db)
    (model,) = doc["models"]
    cols = {c["id"]: c for c in model["columns"]}
    return doc, model, cols, by


def test_columns_ratios_and_quality_from_stored_runs(doc_and_rows, artifacts):
    doc, model, cols, by = doc_and_rows
    assert model["model"] == MODEL and len(cols) == 5
    fp32, int8 = by[("fp32", 1)], by[("int8", 1)]
    c8 = cols[int8.id]
    assert c8["bits"] == "INT8" and cols[by[("int4", 1)].id]["bits"] == "INT4"
    assert cols[by[("mixed", 1)].id]["bits"] == "mixed" and cols[fp32.id]["is_fp32"]
    # hand-computed from the stored rows
    assert c8["vs_fp32"]["baseline_id"] == fp32.id
    assert c8["vs_fp32"]["speedup_p50"] == pytest.approx(fp32.p50_ms / int8.p50_ms)
    assert c8["vs_fp32"]["latency_significant"] == (int8.ci_high_ms < fp32.ci_low_ms or fp32.ci_high_ms < int8.ci_low_ms)
    assert c8["latency_ms"]["ci95_median"] == [int8.ci_low_ms, int8.ci_high_ms]
    size8, size32 = artifacts["int8"].stat().st_size, artifacts["fp32"].stat().st_size
    assert c8["size"]["file_reduction_vs_fp32"] == pytest.approx(1 - size8 / size32)
    quant = json.loads((artifacts["int8"].parent / "int8.qdir" / "quant.json").read_text())
    assert c8["size"]["weights_size_reduction"] == quant["size_reduction"]
    assert c8["quality"]["value"] == VARIANTS["int8"][1]
    assert c8["quality_delta"]["delta"] == pytest.approx(0.25)
    assert c8["quality_delta"]["delta_pct"] == pytest.approx(2.5)
    assert c8["peak_rss_mb"] == int8.peak_rss_mb and c8["peak_rss_mb"] > 0
    # the agent ran with --power-meter none: energy is not measured, and says why
    assert c8["energy"]["per_inference_mj"] is None
    assert "power metering disabled" in c8["energy"]["reason"]
    assert c8["vs_fp32"]["energy_ratio"] is None
    assert c8["fingerprint"]["fingerprint_sha256"] == int8.fingerprint_sha256
    assert c8["fingerprint"]["runtime"] == "onnxruntime"
    # what ONNX Runtime on the agent made of the file, stored with the run and shown in the environment table
    kernels = c8["fingerprint"]["kernels"]["kernels"]
    assert kernels == int8.result["runtime"]["kernels"]
    assert kernels["integer"] == {"MatMulIntegerToFloat": 1, "QLinearMatMul": 1}  # both QDQ MatMuls fused
    from edgeq.report.tables import _kernels_text

    assert _kernels_text(c8["fingerprint"]["kernels"]) == ("integer: 1 MatMulIntegerToFloat, 1 QLinearMatMul; "
                                                           "float over dequantized: none")


def test_pareto_membership_matches_hand_computation(doc_and_rows):
    doc, model, cols, by = doc_and_rows
    p = model["pareto"]
    # size (deterministic): fp32 > int8 > mixed > int4 bytes; ppl 10 < 10.25 < 12 (int4) < 12.5 (mixed)
    assert set(p["size"]) == {cols[by[(n, 1)].id]["artifact_sha256"] for n in ("fp32", "int8", "int4")}
    # latency: recompute from the stored p50s of the one-thread group
    pts = {by[(n, 1)].id: (VARIANTS[n][1], by[(n, 1)].p50_ms) for n in VARIANTS}
    expect = {i for i, (q, c) in pts.items()
              if not any(q2 <= q and c2 <= c and (q2 < q or c2 < c) for j, (q2, c2) in pts.items() if j != i)}
    group = cols[by[("fp32", 1)].id]["group"]
    assert set(p["latency"][group]) == expect
    assert by[("fp32", 1)].id in expect  # the best quality is always on the front
    assert p["energy"] == {}  # nothing measured, nothing ranked


def test_threads_mismatch_flagged_and_forced(doc_and_rows, profiled_db):
    doc, model, cols, by = doc_and_rows
    two = cols[by[("int8", 2)].id]["vs_fp32"]
    assert any("threads differs: 2" in f for f in two["flags"])
    assert two["excluded"] and two["speedup_p50"] is None
    assert [f["id"] for f in doc["flagged"]] == [by[("int8", 2)].id]
    forced = {c["id"]: c for c in build_report(profiled_db, force=True)["models"][0]["columns"]}
    f2 = forced[by[("int8", 2)].id]["vs_fp32"]
    assert f2["forced"] and f2["speedup_p50"] == pytest.approx(by[("fp32", 1)].p50_ms / by[("int8", 2)].p50_ms)


def test_bit_allocation_parity_and_summary(doc_and_rows, artifacts):
    doc, model, cols, by = doc_and_rows
    mixed = [b for b in model["bit_allocation"] if b["mixed"]]
    assert len(mixed) == 1 and [layer["bits"] for layer in mixed[0]["layers"]] == [4, 8]
    parity = {r["artifact_sha256"]: r for r in model["parity"]}
    meta = json.loads(artifacts["int4"].with_name("int4.onnx.json").read_text())
    assert parity[meta["sha256"]]["max_abs"] == meta["parity"]["max_abs"]
    # the verdict FILE.json holds, in words; none for a FILE.json from before verdicts
    int8 = json.loads(artifacts["int8"].with_name("int8.onnx.json").read_text())
    assert parity[int8["sha256"]]["verdict"] == "misses top1_agree 0.7500 < 0.85; explained by the file's output grids"
    assert parity[meta["sha256"]]["verdict"] is None
    # the board's outputs against this host's on the same inputs: one record per run of the file (a local agent:
    # the same runtime, so the same outputs)
    (run,) = parity[meta["sha256"]]["on_device"]
    assert run["run"] == by[("int4", 1)].id and run["compared"] and run["agrees"] and run["cos_min"] > 0.999999
    assert run["reference"].startswith("onnxruntime ") and run["reference"].endswith(" on this host")
    assert parity[meta["sha256"]]["on_device_note"].startswith(f"local #{run['run']}: same as onnxruntime ")
    summary = {(r["bits"], r["id"]) for r in doc["summary"]}
    assert ("INT8", by[("int8", 1)].id) in summary and ("INT4", by[("int4", 1)].id) in summary


def test_qdir_gone_is_reported_not_guessed(profiled_db, artifacts, tmp_path):
    qjson = artifacts["mixed"].parent / "mixed.qdir" / "quant.json"
    moved = tmp_path / "quant.json"
    qjson.rename(moved)
    try:
        model = build_report(profiled_db)["models"][0]
    finally:
        moved.rename(qjson)
    (b,) = [b for b in model["bit_allocation"] if "mixed.onnx" in b["label"]]
    assert b["layers"] is None and "no longer exists" in b["source"]


def test_write_three_formats_and_cli(profiled_db, tmp_path, capsys):
    html_path = write_report(profiled_db, tmp_path / "r.html")
    text = html_path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and 'data-table="main"' in text
    assert "<script" not in text and "<link" not in text and no_fetches(text)
    md = write_report(profiled_db, tmp_path / "r.md").read_text()
    assert "| run | board | variant |" in md and "not measured [" in md
    data = json.loads(write_report(profiled_db, tmp_path / "r.json").read_text())
    assert data["edgeq_report"] == 1 and data["models"][0]["model"] == MODEL
    # the call `edgeq demo` makes: positional model / device filters, returns the path
    assert write_report(profiled_db, tmp_path / "demo.html", MODEL, "local") == tmp_path / "demo.html"
    rc = main(["report", "--db", str(profiled_db), "--device", "local", "-o", str(tmp_path / "c.md")])
    assert rc == 0 and (tmp_path / "c.md").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.md")
    rc = main(["report", "--db", str(profiled_db), "--model", "toy-matmull", "-o", str(tmp_path / "typo.md")])
    assert rc == 0 and "_No runs in the database match the filters._" in (tmp_path / "typo.md").read_text()
    assert capsys.readouterr().err == (f"edgeq: note: --model 'toy-matmull' matches no stored run (the database has: "
                                       f"{MODEL})\n")
    assert main(["report", "--db", str(profiled_db), "-o", str(tmp_path / "r.pdf")]) == 2
    assert "output suffix" in capsys.readouterr().err
    assert main(["report", "--db", str(profiled_db)]) == 2


def test_compare_cli(profiled_db, capsys):
    a, b = sorted(r.id for r in store.list_results(profiled_db))[:2]
    assert main(["report", "--db", str(profiled_db), "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"Run #{a} (A) vs run #{b} (B)" in out and "significance of the p50 difference" in out
    assert "confidence intervals do not overlap" in out  # the method is stated
    out_json = profiled_db.parent / "cmp.json"
    assert main(["report", "--db", str(profiled_db), "--compare", str(a), str(b), "-o", str(out_json)]) == 0
    cmp = json.loads(out_json.read_text())
    assert (cmp["a"]["id"], cmp["b"]["id"]) == (a, b)
    ra, rb = store.get_result(profiled_db, a), store.get_result(profiled_db, b)
    assert cmp["diff"]["p50_diff_ms"] == pytest.approx(rb.p50_ms - ra.p50_ms)
    assert cmp["diff"]["significant"] == (ra.ci_high_ms < rb.ci_low_ms or rb.ci_high_ms < ra.ci_low_ms)


def test_eval_result_rows_are_matched_by_sha(profiled_db, artifacts):
    """An `edgeq eval --db` row (record_eval_result) for a file shows up as that file's quality."""
    sha = sha256_file(artifacts["int4"])
    store.record_eval_result(profiled_db, {"target": str(artifacts["int4"]), "label": "onnx", "model": MODEL,
                                           "sha256": sha, "task": "ppl", "data": "enwiki",
                                           "metrics": {"ppl": 11.5}, "seconds": 0.1, "threads": 1})
    cols = build_report(profiled_db)["models"][0]["columns"]
    (c4,) = [c for c in cols if c["artifact_sha256"] == sha]
    assert c4["quality"]["value"] == 11.5 and c4["quality_delta"]["delta"] == pytest.approx(1.5)
