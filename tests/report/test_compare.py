"""Report maths on synthetic stored rows: ratios, Pareto membership, flags and the summary by hand."""

from __future__ import annotations

import pytest

from edgeq import store
from edgeq.errors import EdgeqError
from edgeq.report import build_compare, build_report
from edgeq.report.compare import ci_overlap, pareto_front
from edgeq.report.gather import parse_since

M = "synthetic-model"


def _meta(sha: str, size: int, recipe: str | None) -> dict:
    qdir = None if recipe is None else f"/nonexistent/{sha}.qdir"
    return {"format": "onnx", "variant": "fp32" if recipe is None else "int8", "sha256": sha, "size_bytes": size,
            "source": {"model": M, "qdir": qdir, "quant_json_sha256": None if qdir is None else "0" * 64},
            "recipe": recipe, "exact": True, "parity": {"max_abs": 0.5, "cos_min": 0.99, "top1_agree": 1.0}}


def _result(sha: str, p50: float, ci: tuple, energy: float | None, *, threads: int = 1, governor: str = "performance",
            status: str = "valid", reasons: tuple = (), version: str = "1.32.0") -> dict:
    return {"status": status, "artifact_sha256": sha, "format": "onnx", "threads": threads,
            "invalid_reasons": list(reasons), "size_bytes": 1,
            "runtime": {"name": "onnxruntime", "version": version, "provider": "CPUExecutionProvider"},
            "latency_ms": {"n": 100, "p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.5, "ci95_median": list(ci)},
            "peak_rss_mb": 50.0,
            "power": {"energy_per_inference_mj": energy, "energy_per_inference_net_mj": None,
                      "mean_w": None if energy is None else 3.0,
                      "reason": None if energy is not None else "no power sensor found", "meter": "ina3221"},
            "fingerprint": {"cpu_model": "Cortex-A76", "governor": {"cpu0": governor, "cpu1": governor}}}


# name -> (sha, size bytes, recipe, ppl)
ARTS = {"fp32": ("a" * 64, 1000, None, 10.0), "int8": ("b" * 64, 300, "w8a8", 10.5),
        "int4": ("c" * 64, 200, "w4a16", 11.0), "bad": ("d" * 64, 250, "w4-g128", 12.0)}


def _add(db, name, device, *args, **kw) -> int:
    sha, size, recipe, _ = ARTS[name]
    return store.record_result(db, _result(sha, *args, **kw), device=device, artifact_path=f"/x/{name}.onnx",
                               export_meta=_meta(sha, size, recipe))


@pytest.fixture
def synth_db(tmp_path):
    db = tmp_path / "synth.sqlite"
    ids = {
        "fp32": _add(db, "fp32", "pi5", 10.0, (9.8, 10.2), 50.0),
        "int8": _add(db, "int8", "pi5", 5.0, (4.9, 5.1), 20.0),
        "int4": _add(db, "int4", "pi5", 8.0, (7.9, 8.1), 30.0),
        "bad": _add(db, "bad", "pi5", 9.0, (8.5, 9.9), 40.0),
        "pi4_fp32": _add(db, "fp32", "pi4", 20.0, (19.0, 21.0), None),
        "pi4_int8": _add(db, "int8", "pi4", 12.0, (11.0, 13.0), None, governor="ondemand"),
        "pi4_int4": _add(db, "int4", "pi4", 15.0, (14.0, 16.0), None, status="invalid",
                         reasons=("only 3 timed runs, the minimum is 50",)),
    }
    store.record_result(db, {"status": "failed", "error": "memory limit exceeded", "artifact_sha256": "e" * 64},
                        device="pi4")
    for name, (sha, _, _, ppl) in ARTS.items():
        store.record_eval(db, target_sha256=sha, target_path=None, model_ref=M, task="ppl",
                          metrics={"ppl": ppl}, data="enwiki")
    return db, ids


def _cols(doc):
    (model,) = doc["models"]
    return {c["id"]: c for c in model["columns"]}, model


def test_ratios_quality_and_size_by_hand(synth_db):
    db, ids = synth_db
    cols, _ = _cols(build_report(db))
    int8, int4 = cols[ids["int8"]], cols[ids["int4"]]
    assert int8["bits"] == "INT8" and int4["bits"] == "INT4" and cols[ids["fp32"]]["bits"] == "FP32"
    assert int8["vs_fp32"]["baseline_id"] == ids["fp32"]
    assert int8["vs_fp32"]["speedup_p50"] == pytest.approx(10.0 / 5.0)
    assert int8["vs_fp32"]["speedup_p90"] == pytest.approx(12.0 / 6.0)
    assert int8["vs_fp32"]["energy_ratio"] == pytest.approx(20.0 / 50.0)
    assert int8["vs_fp32"]["latency_significant"] is True
    assert int4["vs_fp32"]["speedup_p50"] == pytest.approx(1.25)
    assert int4["vs_fp32"]["energy_ratio"] == pytest.approx(0.6)
    assert int8["size"]["file_reduction_vs_fp32"] == pytest.approx(0.7)
    assert int4["size"]["file_reduction_vs_fp32"] == pytest.approx(0.8)
    assert int8["quality_delta"]["delta"] == pytest.approx(0.5)
    assert int8["quality_delta"]["delta_pct"] == pytest.approx(5.0)
    assert int8["size"]["weights_size_reduction"] is None
    assert "no longer exists" in int8["size"]["quant_note"]
    bad = cols[ids["bad"]]
    assert bad["vs_fp32"]["latency_significant"] is False  # [8.5, 9.9] overlaps [9.8, 10.2]
    pi4 = cols[ids["pi4_fp32"]]
    assert pi4["energy"]["per_inference_mj"] is None and pi4["energy"]["reason"] == "no power sensor found"


def test_pareto_membership_by_hand(synth_db):
    db, ids = synth_db
    _, model = _cols(build_report(db))
    p = model["pareto"]
    pi5 = [g for g in p["latency"] if g.startswith("pi5")]
    assert len(pi5) == 1
    assert set(p["latency"][pi5[0]]) == {ids["fp32"], ids["int8"]}
    assert set(p["energy"][pi5[0]]) == {ids["fp32"], ids["int8"]}
    assert set(p["size"]) == {ARTS[n][0] for n in ("fp32", "int8", "int4")}  # 'bad' is bigger and worse than int4
    assert ids["pi4_int4"] in p["excluded"]  # INVALID
    # pi4: the ondemand int8 run is its own envelope group, so it is not ranked against performance runs
    assert any("ondemand" in g for g in p["latency"])


def test_incomparable_runs_flagged_and_kept_out_unless_forced(synth_db):
    db, ids = synth_db
    doc = build_report(db)
    cols, _ = _cols(doc)
    gov = cols[ids["pi4_int8"]]["vs_fp32"]
    assert any("governor differs" in f for f in gov["flags"])
    assert gov["excluded"] and gov["speedup_p50"] is None
    inv = cols[ids["pi4_int4"]]["vs_fp32"]
    assert any("INVALID" in f for f in inv["flags"]) and inv["speedup_p50"] is None
    assert {f["id"] for f in doc["flagged"]} == {ids["pi4_int8"], ids["pi4_int4"]}
    assert [s["status"] for s in doc["skipped_runs"]] == ["failed"]
    forced = _cols(build_report(db, force=True))[0]
    g = forced[ids["pi4_int8"]]["vs_fp32"]
    assert g["forced"] and g["speedup_p50"] == pytest.approx(20.0 / 12.0)
    assert forced[ids["pi4_int8"]]["vs_fp32"]["energy_ratio"] is None  # not measured on pi4: stays missing


def test_summary_by_hand(synth_db):
    db, ids = synth_db
    rows = {(r["device"], r["id"]): r for r in build_report(db)["summary"]}
    r8 = rows[("pi5", ids["int8"])]
    assert (r8["bits"], r8["baseline_id"]) == ("INT8", ids["fp32"])
    assert r8["size_reduction"] == pytest.approx(0.7)
    assert r8["quality_delta"] == pytest.approx(0.5)
    assert r8["latency_reduction"] == pytest.approx(0.5)
    assert r8["energy_reduction"] == pytest.approx(0.6)
    r4 = rows[("pi5", ids["int4"])]
    assert r4["bits"] == "INT4" and r4["latency_reduction"] == pytest.approx(0.2)
    assert r4["energy_reduction"] == pytest.approx(0.4)
    assert rows[("pi4", ids["pi4_int8"])]["excluded"]
    assert rows[("pi4", ids["pi4_int8"])]["energy_reduction"] is None


def test_filters(synth_db):
    db, ids = synth_db
    doc = build_report(db, device="pi4")
    assert {c["device"] for c in doc["models"][0]["columns"]} == {"pi4"}
    assert build_report(db, model="other")["models"] == []
    assert build_report(db, since="2999-01-01")["models"] == []
    assert len(build_report(db, since="2000-01-01T00:00:00Z")["models"][0]["columns"]) == 7
    with pytest.raises(EdgeqError, match="--since"):
        build_report(db, since="yesterday")
    with pytest.raises(EdgeqError, match="does not exist"):
        build_report(db.parent / "missing.sqlite")


def test_compare_two_runs(synth_db):
    db, ids = synth_db
    d = build_compare(db, ids["fp32"], ids["int8"])
    assert d["diff"]["p50_diff_ms"] == pytest.approx(-5.0)
    assert d["diff"]["p50_ratio"] == pytest.approx(0.5)
    assert d["diff"]["energy_diff_mj"] == pytest.approx(-30.0)
    assert d["diff"]["significant"] is True and not d["same_artifact"]
    d2 = build_compare(db, ids["fp32"], ids["bad"])
    assert d2["diff"]["significant"] is False
    d3 = build_compare(db, ids["pi4_fp32"], ids["pi4_int8"])
    assert any("governor" in f for f in d3["envelope_flags"])
    with pytest.raises(EdgeqError, match="not in the database"):
        build_compare(db, ids["fp32"], 9999)


def test_pareto_front_and_ci_overlap_units():
    pts = [("a", 10.0, 5.0), ("b", 11.0, 4.0), ("c", 12.0, 4.0), ("d", 10.0, 5.0), ("e", 9.0, 9.0)]
    assert pareto_front(pts, higher_is_better=False) == {"a", "b", "d", "e"}  # c: same cost as b, worse ppl
    assert pareto_front(pts, higher_is_better=True) == {"c"}  # c has the highest quality at the lowest cost
    assert pareto_front([], True) == set()
    assert ci_overlap((1.0, 2.0), (2.0, 3.0)) is True
    assert ci_overlap((1.0, 2.0), (2.1, 3.0)) is False
    assert ci_overlap((None, 2.0), (1.0, 3.0)) is None
    assert parse_since("2026-11-23").tzinfo is not None


def test_record_eval_result_maps_evaluate_output(tmp_path):
    db = tmp_path / "e.sqlite"
    base = {"label": "onnx", "model": "tiny-llama", "task": "ppl", "data": "enwiki", "metrics": {"ppl": 3.5},
            "seconds": 1.2, "threads": 1}
    store.record_eval_result(db, {**base, "target": "/x/m.onnx", "sha256": "f" * 64})
    store.record_eval_result(db, {**base, "target": "tiny-llama", "label": "fp32", "sha256": None})
    ref, file_ = store.list_evals(db)
    assert (file_.target_sha256, file_.target_path, file_.model_ref, file_.task) == ("f" * 64, "/x/m.onnx",
                                                                                   "tiny-llama", "ppl")
    assert file_.metrics == {"ppl": 3.5} and file_.data == "enwiki"
    assert file_.meta == {"label": "onnx", "seconds": 1.2, "threads": 1}
    assert ref.target_sha256 == store.reference_sha256("tiny-llama")
    assert ref.meta["sha256_of"] == "model reference (no file)"


def test_runtime_version_mismatch_is_flagged(tmp_path):
    db = tmp_path / "v.sqlite"
    base = _add(db, "fp32", "jetson", 10.0, (9.0, 11.0), None)
    new = _add(db, "int8", "jetson", 5.0, (4.0, 6.0), None, version="1.33.0")
    (model,) = build_report(db)["models"]
    (col,) = [c for c in model["columns"] if c["id"] == new]
    assert col["vs_fp32"]["baseline_id"] == base
    assert col["vs_fp32"]["flags"] == [f"runtime_version differs: 1.33.0 (#{new}) vs 1.32.0 (#{base})"]
    assert col["vs_fp32"]["speedup_p50"] is None
    assert col["quality"] is None  # no eval stored: shown as not measured, never guessed
    assert col["quality_delta"]["delta"] is None
    from edgeq.report.tables import _delta, _size_bytes

    assert _delta(col) == "not measured (no evaluation of this file's sha256)"
    # sizes in the decimal units `edgeq export` prints, with the exact count
    assert (_size_bytes(539_770_123), _size_bytes(7920), _size_bytes(512)) == \
        ("539.77 MB (539,770,123 B)", "7.92 kB (7,920 B)", "512 B")


def test_the_boards_warnings_reach_the_report(tmp_path):
    """What the agent noticed of a run (more threads than cores, a runtime older than the file was tested with) is in
    the report: the main table's flags, the JSON, and `report compare` (it was stored and never shown)."""
    from edgeq.report.tables import compare_tables, model_tables

    db = tmp_path / "w.sqlite"
    base = _add(db, "fp32", "pi5", 10.0, (9.8, 10.2), None)
    warned = "threads 4 exceed the 2 CPUs this job may run on: its threads share cores"
    sha, size, recipe, _ = ARTS["int8"]
    run = store.record_result(db, {**_result(sha, 5.0, (4.9, 5.1), None), "warnings": [warned]}, device="pi5",
                              artifact_path="/x/int8.onnx", export_meta=_meta(sha, size, recipe))
    (model,) = build_report(db)["models"]
    cols = {c["id"]: c for c in model["columns"]}
    assert cols[run]["warnings"] == [warned] and cols[base]["warnings"] == []
    main = model_tables(model)[0]
    flags = {row[0]: row[-1] for row in main.rows}
    assert flags[f"#{run}"] == f"board: {warned}" and flags[f"#{base}"] == "-"
    compare = compare_tables(build_compare(db, base, run))[0]
    assert ["board's warnings", "-", warned] in compare.rows
    energy = next(r for r in compare.rows if r[0] == "energy / inference mJ")
    assert energy[1].startswith("not measured (no power sensor found")


def test_a_run_whose_outputs_differ_from_the_hosts_is_kept_out_of_ratios_and_fronts(tmp_path):
    """A board that computed something else than the file (its output check against the host DIFFERs) timed a wrong
    computation: the report flags the run and leaves it out of the speedup and the Pareto fronts (--force puts it
    back), as for an INVALID run."""
    from edgeq.report.tables import model_tables

    db = tmp_path / "d.sqlite"
    base = _add(db, "fp32", "pi5", 10.0, (9.8, 10.2), None)
    check = {"compared": True, "agrees": False, "cos_min": 0.0, "max_abs": 5.2, "argmax_agree": 0.0,
             "reference": "litert 2.3.0 on this host"}
    sha, size, recipe, ppl = ARTS["int8"]
    run = store.record_result(db, {**_result(sha, 2.0, (1.9, 2.1), None), "output_check": check}, device="pi5",
                              artifact_path="/x/int8.onnx", export_meta=_meta(sha, size, recipe))
    for name in ("fp32", "int8"):
        store.record_eval(db, target_sha256=ARTS[name][0], target_path=None, model_ref=M, task="ppl",
                          metrics={"ppl": ARTS[name][3]}, data="enwiki")
    cols, model = _cols(build_report(db))
    v = cols[run]["vs_fp32"]
    assert cols[run]["outputs_differ"] and not cols[base]["outputs_differ"]
    assert v["speedup_p50"] is None and v["excluded"].startswith("envelope differs")
    assert f"run #{run}'s outputs differ from litert 2.3.0 on this host (cosine 0.0000)" in v["flags"][0]
    assert run in model["pareto"]["excluded"] and base not in model["pareto"]["excluded"]
    pareto = {row[0]: row for row in model_tables(model)[1].rows}
    assert pareto[f"#{run}"][3] == "excluded (its outputs differ from the host's)"
    forced, _ = _cols(build_report(db, force=True))
    assert forced[run]["vs_fp32"]["speedup_p50"] == pytest.approx(5.0) and forced[run]["vs_fp32"]["forced"]


def test_decode_signature_runs_are_their_own_columns(tmp_path):
    """The prefill and the decode step of one TFLite file (same sha256) are two columns, each compared with
    the FP32 file's run of the same signature."""
    db = tmp_path / "s.sqlite"

    def add(name, p50, signature):
        sha, size, recipe, _ = ARTS[name]
        result = {**_result(sha, p50, (p50 * 0.9, p50 * 1.1), None), "config": {"signature": signature}}
        return store.record_result(db, result, device="pi5", artifact_path=f"/x/{name}.tflite",
                                   export_meta=_meta(sha, size, recipe))

    ids = {("fp32", None): add("fp32", 100.0, None), ("fp32", "decode"): add("fp32", 10.0, "decode"),
           ("int8", None): add("int8", 50.0, None), ("int8", "decode"): add("int8", 2.0, "decode")}
    (model,) = build_report(db)["models"]
    cols = {c["id"]: c for c in model["columns"]}
    assert set(cols) == set(ids.values())
    assert cols[ids[("int8", "decode")]]["label"].startswith("int8 [decode]")
    assert cols[ids[("int8", "decode")]]["vs_fp32"]["baseline_id"] == ids[("fp32", "decode")]
    assert cols[ids[("int8", "decode")]]["vs_fp32"]["speedup_p50"] == pytest.approx(5.0)
    assert cols[ids[("int8", None)]]["vs_fp32"]["baseline_id"] == ids[("fp32", None)]


def test_weight_cache_runs_are_their_own_columns(tmp_path):
    """A file timed through the Interpreter and through CompiledModel with XNNPACK's weight cache: two columns, the
    second labelled, each compared with the FP32 file under the same runtime."""
    db = tmp_path / "w.sqlite"

    def add(name, p50, runtime):
        sha, size, recipe, _ = ARTS[name]
        result = _result(sha, p50, (p50 * 0.9, p50 * 1.1), None)
        result.update(format="tflite", runtime={"name": runtime, "version": "2.3.0", "provider": "XNNPACK delegate"})
        return store.record_result(db, result, device="pi5", artifact_path=f"/x/{name}.tflite",
                                   export_meta=_meta(sha, size, recipe))

    ids = {(n, r): add(n, p50, r) for n, p50 in (("fp32", 100.0), ("int8", 40.0)) for r in ("litert", "litert-compiledmodel")}
    (model,) = build_report(db)["models"]
    cols = {c["id"]: c for c in model["columns"]}
    assert set(cols) == set(ids.values())
    assert cols[ids[("int8", "litert-compiledmodel")]]["label"].startswith("int8 [weight cache]")
    assert "[weight cache]" not in cols[ids[("int8", "litert")]]["label"]
    for runtime in ("litert", "litert-compiledmodel"):
        assert cols[ids[("int8", runtime)]]["vs_fp32"]["baseline_id"] == ids[("fp32", runtime)]


def test_empty_database_gives_an_empty_report(tmp_path):
    db = tmp_path / "empty.sqlite"
    store.init_db(db)  # the schema, no rows
    doc = build_report(db)
    assert doc["models"] == [] and doc["summary"] == [] and doc["flagged"] == []
    from edgeq.report.render import to_html, to_markdown

    assert "No runs in the database match the filters" in to_html(doc)
    assert "No INT8 or INT4 runs" in to_markdown(doc)


def test_summary_without_an_fp32_run_says_so(tmp_path):
    db = tmp_path / "int8-only.sqlite"
    rid = _add(db, "int8", "pi5", 5.0, (4.9, 5.1), 20.0)
    from edgeq.report.render import to_markdown

    (row,) = build_report(db)["summary"]
    assert row["baseline_id"] is None and row["excluded"]
    text = to_markdown(build_report(db))
    assert f"#{rid} vs no FP32 run" in text and "#None" not in text


def test_quality_is_compared_only_with_fp32_measured_the_same_way(tmp_path):
    """Perplexity depends on the window length and the windows read: a TFLite file fixed at 64 tokens is compared with
    FP32's evaluation on 64-token windows, not with the newer one on 512; with none like it, no delta is given."""
    db = tmp_path / "settings.sqlite"
    ids = {name: _add(db, name, "pi5", p50, (p50 - 0.1, p50 + 0.1), None)
           for name, p50 in (("fp32", 10.0), ("int8", 5.0), ("int4", 8.0))}

    def ev(name, ppl, seq_len, windows):
        store.record_eval(db, target_sha256=ARTS[name][0], target_path=None, model_ref=M, task="ppl",
                          metrics={"ppl": ppl, "windows": windows}, data="enwiki", meta={"seq_len": seq_len})

    ev("fp32", 12.0, 64, 4)
    ev("fp32", 9.0, 512, 16)  # newer, and what the model's FP32 quality shows
    ev("int8", 12.5, 64, 4)
    ev("int4", 11.0, 128, 4)
    cols, model = _cols(build_report(db))
    assert model["fp32_quality"]["value"] == 9.0
    assert cols[ids["int8"]]["quality_delta"]["delta"] == pytest.approx(0.5)
    d4 = cols[ids["int4"]]["quality_delta"]
    assert d4["delta"] is None and d4["note"] == ("not comparable: FP32 was evaluated as ppl on enwiki, 512-token "
                                                  "windows, 16 samples, this file as ppl on enwiki, 128-token windows, "
                                                  "4 samples")
