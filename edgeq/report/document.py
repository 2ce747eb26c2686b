"""The report document: one JSON-ready dict that every renderer (HTML, Markdown, JSON) reads.

Building it is the only place gathered columns and comparisons meet, so the three renderings can
never disagree. Missing numbers are None with a `*_note` / `reason` saying why; they are never
filled in.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from .. import store
from ..export.verdict import verdict_text
from ..agent.stats import CI_METHOD
from . import compare as cmp
from .gather import Column, Gathered, gather, reference_quality

REPORT_VERSION = 1
SUMMARY_CLASSES = ("INT8", "INT4")


def _fingerprint(col: Column) -> dict[str, Any]:
    r = col.result
    fp = r.fingerprint or {}
    env = cmp.envelope(col)
    return {"id": r.id, "device": r.device, "fingerprint_sha256": r.fingerprint_sha256,
            "board": env["board"], "cpu_model": env["cpu_model"], "machine": env["machine"],
            "cpu_count": fp.get("cpu_count"), "mem_total_mb": fp.get("mem_total_mb"), "kernel": env["kernel"],
            "os": fp.get("os"), "python": fp.get("python"), "runtime": r.runtime,
            "runtime_version": r.runtime_version, "provider": r.provider, "threads": r.threads,
            "governor": env["governor"], "freq_max_khz": env["freq_max_khz"], "kernels": _kernels(r.result)}


def _kernels(result: dict | None) -> dict[str, Any]:
    """What the board's runtime made of the file, as the agent measured it there: ONNX Runtime's optimized graph
    (`kernels`) or XNNPACK's share of a TFLite graph (`xnnpack`), each with its note; {} for older results."""
    runtime = (result or {}).get("runtime") or {}
    return {k: runtime[k] for k in ("kernels", "kernels_note", "xnnpack", "xnnpack_note") if k in runtime}


def _size(col: Column, fp32_file: Column | None) -> dict[str, Any]:
    size = col.size_bytes
    q = col.quant or {}
    out = {"bytes": size, "file_reduction_vs_fp32": None, "fp32_file_bytes": None,
           "weights_bytes_before": q.get("bytes_before"), "weights_bytes_after": q.get("bytes_after"),
           "weights_size_reduction": q.get("size_reduction"), "avg_bits": q.get("avg_bits"),
           "quant_note": col.quant_note}
    if fp32_file is not None and size and fp32_file.size_bytes:
        out["fp32_file_bytes"] = fp32_file.size_bytes
        out["file_reduction_vs_fp32"] = 1.0 - size / fp32_file.size_bytes
    return out


def _column_doc(col: Column, columns: list[Column], g: Gathered, force: bool) -> dict[str, Any]:
    r = col.result
    fp32_files = [c for c in columns if c.is_fp32 and c.model == col.model and c.fmt == col.fmt]
    base = cmp.baseline_for(col, columns)
    ratios = cmp.ratios_vs_fp32(col, base, force) if not col.is_fp32 else {
        "baseline_id": col.id, "speedup_p50": None, "speedup_p90": None, "latency_significant": None,
        "energy_ratio": None, "energy_net_ratio": None, "flags": cmp.invalid_flags(col), "excluded": None,
        "forced": False}
    quality = col.quality.to_dict() if col.quality else None
    ref_quality, _ = reference_quality(g, col.model, col.fmt, col.quality.setting if col.quality else None)
    return {
        "id": r.id, "created": r.created, "device": r.device, "model": col.model, "variant": col.variant,
        "label": col.label, "format": col.fmt, "bits": col.bits, "bits_source": col.bits_source,
        "is_fp32": col.is_fp32, "artifact_sha256": col.sha,
        "artifact_name": Path(r.artifact_path).name if r.artifact_path else None,
        "status": r.status, "invalid_reasons": r.invalid_reasons or [], "superseded_runs": col.superseded,
        "warnings": (r.result or {}).get("warnings") or [],  # what the board noticed of its run (threads over cores...)
        "outputs_differ": cmp.outputs_differ(col) is not None,  # from the host's: a wrong computation was timed
        "runtime": r.runtime, "runtime_version": r.runtime_version, "provider": r.provider,
        "threads": r.threads, "group": cmp.envelope_group(col, force),
        "size": _size(col, fp32_files[0] if fp32_files else None),
        "quality": quality, "quality_delta": cmp.quality_delta(col, ref_quality),
        "latency_ms": {"n": r.n_runs, "p50": r.p50_ms, "p90": r.p90_ms, "p99": r.p99_ms,
                       "ci95_median": [r.ci_low_ms, r.ci_high_ms]},
        "peak_rss_mb": r.peak_rss_mb,
        "energy": {"per_inference_mj": r.energy_mj, "per_inference_net_mj": r.energy_net_mj,
                   "mean_power_w": r.power_w,
                   "reason": None if r.energy_mj is not None else (r.power_reason or "no reason stored"),
                   "meter": r.power_reason if r.energy_mj is not None else None},
        "vs_fp32": ratios,
        "fingerprint": _fingerprint(col),
    }


def _pareto(cols: list[dict], force: bool) -> dict[str, Any]:
    """Fronts of quality vs latency and vs energy per envelope group, and vs size per model."""
    measured = [c for c in cols if c["quality"] and c["quality"]["value"] is not None]
    tasks = [c["quality"]["task"] for c in measured]
    task = max(set(tasks), key=tasks.count) if tasks else None  # one quality axis: the commonest task
    usable = [c for c in measured if c["quality"]["task"] == task
              and (force or (c["status"] == "valid" and not c["outputs_differ"]))]
    ids = {c["id"] for c in usable}
    out: dict[str, Any] = {"latency": {}, "energy": {}, "size": [], "method": cmp.PARETO_METHOD, "task": task,
                           "excluded": sorted(c["id"] for c in cols if c["id"] not in ids)}
    for axis, get in (("latency", lambda c: c["latency_ms"]["p50"]),
                      ("energy", lambda c: c["energy"]["per_inference_mj"])):
        groups: dict[str, list] = {}
        for c in usable:
            if get(c) is not None:
                groups.setdefault(c["group"], []).append(c)
        for g, members in groups.items():
            higher = members[0]["quality"]["higher_is_better"]
            out[axis][g] = sorted(cmp.pareto_front(((c["id"], c["quality"]["value"], get(c)) for c in members),
                                                   higher))
    by_artifact: dict[str, dict] = {}
    for c in usable:  # size does not depend on the board: one point per artifact
        if c["size"]["bytes"] is not None:
            by_artifact.setdefault(c["artifact_sha256"], c)
    if by_artifact:
        pts = list(by_artifact.values())
        higher = pts[0]["quality"]["higher_is_better"]
        out["size"] = sorted(cmp.pareto_front(((c["artifact_sha256"], c["quality"]["value"], c["size"]["bytes"])
                                               for c in pts), higher))
    return out


def _bit_allocation(columns: list[Column]) -> list[dict]:
    seen, out = set(), []
    for c in columns:
        if c.is_fp32 or c.sha in seen:
            continue
        seen.add(c.sha)
        entry = {"artifact_sha256": c.sha, "variant": c.variant, "label": c.label, "bits": c.bits,
                 "source": c.quant_note, "mixed": c.bits == "mixed", "layers": None, "avg_bits": None}
        if c.quant:
            entry["avg_bits"] = c.quant.get("avg_bits")
            entry["layers"] = [{"name": layer.get("name"), "kind": layer.get("kind"),
                                "bits": (layer.get("weight") or {}).get("bits"),
                                "granularity": (layer.get("weight") or {}).get("granularity"),
                                "group_size": (layer.get("weight") or {}).get("group_size"),
                                "activation": (layer.get("activation") or {}).get("mode"),
                                "params": layer.get("params"), "bytes_quant": layer.get("bytes_quant")}
                               for layer in c.quant.get("layers", [])]
        out.append(entry)
    return out


def _parity(columns: list[Column]) -> list[dict]:
    seen, out = set(), []
    for c in columns:
        if c.sha in seen:
            continue
        seen.add(c.sha)
        p = (c.export or {}).get("parity") or {}
        out.append({"artifact_sha256": c.sha, "variant": c.variant, "label": c.label, "format": c.fmt,
                    "exact": (c.export or {}).get("exact"), "max_abs": p.get("max_abs"),
                    "cos_min": p.get("cos_min"), "top1_agree": p.get("top1_agree"),
                    "samples": p.get("samples"), "verdict": verdict_text(p) if p else None,
                    "note": None if p else "no parity in FILE.json",
                    **_on_device([col for col in columns if col.sha == c.sha])})
    return out


def _on_device(runs: list[Column]) -> dict:
    """What each board computed from the file against this host's runtime on the same inputs (the result's
    `output_check`, `agent/outputs.py`): a record per run, and one line for the table."""
    found, parts = [], []
    for c in runs:
        check = (c.result.result or {}).get("output_check")
        if not check:
            continue
        found.append({"run": c.id, "device": c.device, **{k: v for k, v in check.items() if k != "outputs"}})
        if not check.get("compared"):
            parts.append(f"{c.device} #{c.id}: not compared ({check['why']})")
            continue
        argmax = "-" if check["argmax_agree"] is None else f"{check['argmax_agree']:.4f}"
        parts.append(f"{c.device} #{c.id}: {'same as' if check['agrees'] else 'DIFFERS from'} {check['reference']} "
                     f"(cosine {check['cos_min']:.6f}, argmax agreement {argmax})")
    return {"on_device": found or None,
            "on_device_note": "; ".join(parts) or "not measured: no run of it returned outputs (profiled by an agent "
                                                  "that returned timings only)"}


def _summary(models: list[dict]) -> list[dict]:
    """INT8 / INT4 against FP32 per model and board: size, quality, latency and energy reduction."""
    rows = []
    for m in models:
        for c in m["columns"]:
            if c["bits"] not in SUMMARY_CLASSES:
                continue
            v = c["vs_fp32"]
            red = lambda x: None if x is None else 1.0 - x  # noqa: E731
            rows.append({
                "model": m["model"], "device": c["device"], "bits": c["bits"], "variant": c["variant"],
                "label": c["label"], "id": c["id"], "baseline_id": v["baseline_id"],
                "size_reduction": c["size"]["file_reduction_vs_fp32"],
                "weights_size_reduction": c["size"]["weights_size_reduction"],
                "quality_metric": (c["quality"] or {}).get("metric"),
                "quality_delta": c["quality_delta"]["delta"], "quality_delta_pct": c["quality_delta"]["delta_pct"],
                "latency_reduction": red(None if v["speedup_p50"] is None else 1.0 / v["speedup_p50"]),
                "latency_significant": v["latency_significant"],
                "energy_reduction": red(v["energy_ratio"]),
                "energy_note": None if v["energy_ratio"] is not None else (
                    v["excluded"] or c["energy"]["reason"] or "FP32 energy not measured"),
                "excluded": v["excluded"], "forced": v["forced"],
            })
    return rows


def build_report(db: str | os.PathLike | None = None, *, model: str | None = None, device: str | None = None,
                 since: str | None = None, force: bool = False) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (see the module docstring)."""
    g: Gathered = gather(db, model=model, device=device, since=since)
    models = []
    for name in sorted({c.model for c in g.columns}):
        cols = [c for c in g.columns if c.model == name]
        fmts = sorted({c.fmt for c in cols})
        ref_q, ref_note = reference_quality(g, name, fmts[0] if fmts else "")
        docs = [_column_doc(c, cols, g, force) for c in cols]
        models.append({"model": name, "fp32_quality": ref_q.to_dict() if ref_q else None,
                       "fp32_quality_source": ref_note, "columns": docs, "pareto": _pareto(docs, force),
                       "bit_allocation": _bit_allocation(cols), "parity": _parity(cols)})
    flagged = [{"id": c["id"], "model": m["model"], "device": c["device"], "variant": c["variant"],
                "label": c["label"],
                "flags": c["vs_fp32"]["flags"], "excluded": c["vs_fp32"]["excluded"], "forced": c["vs_fp32"]["forced"]}
               for m in models for c in m["columns"] if c["vs_fp32"]["flags"]]
    return {
        "edgeq_report": REPORT_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "db": g.db_path, "filters": {"model": model, "device": device, "since": since}, "force": force,
        "methods": {"latency_ci": CI_METHOD, "significance": cmp.SIGNIFICANCE_METHOD, "pareto": cmp.PARETO_METHOD,
                    "speedup": "FP32 p50 / variant p50 on the same board and runtime (> 1: faster)",
                    "energy_ratio": "variant energy per inference / FP32 energy per inference (< 1: less energy)",
                    "size_reduction": "1 - file bytes / FP32 file bytes (FILE.json size_bytes); "
                                      "weights: quant.json size_reduction"},
        "models": models, "summary": _summary(models), "flagged": flagged, "skipped_runs": g.skipped,
    }


def build_compare(db: str | os.PathLike | None, run_a: int, run_b: int) -> dict[str, Any]:
    """Run B against run A (result ids): differences, significance and envelope differences."""
    path = store.resolve_db_path(db)
    a, b = store.get_result(path, run_a), store.get_result(path, run_b)

    def side(r: store.ResultRecord) -> dict:
        return {"id": r.id, "created": r.created, "device": r.device, "variant": r.variant, "model": r.model_ref,
                "artifact_sha256": r.artifact_sha256, "status": r.status, "invalid_reasons": r.invalid_reasons or [],
                "warnings": (r.result or {}).get("warnings") or [],
                "runtime": r.runtime, "runtime_version": r.runtime_version, "threads": r.threads, "n": r.n_runs,
                "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "ci95_median": [r.ci_low_ms, r.ci_high_ms],
                "peak_rss_mb": r.peak_rss_mb, "energy_mj": r.energy_mj,
                "energy_reason": None if r.energy_mj is not None else r.power_reason,
                "fingerprint_sha256": r.fingerprint_sha256}

    def as_col(r: store.ResultRecord) -> Column:
        return Column(r, r.model_ref or "", r.variant or "", r.artifact_format or "", "", "", False,
                      r.export_json, None, "", None, 0)

    return {"edgeq_compare": REPORT_VERSION, "db": str(path), "a": side(a), "b": side(b),
            "diff": cmp.latency_diff(a, b), "envelope_flags": cmp.envelope_diffs(as_col(a), as_col(b)),
            "same_artifact": a.artifact_sha256 == b.artifact_sha256}
