"""The report's tables as plain text cells, shared by the HTML and Markdown renderers.

A `Table` is a title, headers, rows of strings and notes. Formatting lives here once so both
renderings show the same digits; a missing number is always written "not measured" plus why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..console import size_text

NM = "not measured"
NO_VERDICT = "no verdict in FILE.json (an ONNX export before 2026-12-05)"


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)
    key: str = ""  # a stable id for HTML anchors and tests
    footnotes: dict[str, int] = dataclasses.field(default_factory=dict)

    def nm(self, reason: str) -> str:
        """'not measured [n]' with the reason as footnote n (one footnote per distinct reason)."""
        n = self.footnotes.setdefault(reason, len(self.footnotes) + 1)
        return f"{NM} [{n}]"

    def all_notes(self) -> list[str]:
        return [f"[{n}] {NM}: {r}" for r, n in self.footnotes.items()] + self.notes


def num(v: Any, digits: int = 3, why: str | None = None) -> str:
    if v is None:
        return f"{NM} ({why})" if why else NM
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def pct(v: float | None, why: str | None = None) -> str:
    return num(None, why=why) if v is None else f"{100 * v:+.1f}%"


def ms(v: float | None) -> str:
    return NM if v is None else f"{v:.3f}"


def ci(pair) -> str:
    lo, hi = pair
    return "CI " + NM + " (too few runs)" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def _size_bytes(v: int | None) -> str:
    """In the decimal units `edgeq export` prints (539.77 MB), with the exact count."""
    if v is None:
        return NM
    return f"{v:,} B" if v < 1000 else f"{size_text(v)} ({v:,} B)"


def _quality(c: dict, t: Table) -> str:
    q = c["quality"]
    if not q or q["value"] is None:
        return t.nm(f"quality: no evaluation of sha256 {c['artifact_sha256'][:12]} in the database")
    return f"{q['metric']} {num(q['value'], 4)}"


def _delta(c: dict) -> str:
    d = c["quality_delta"]
    if d["delta"] is None:
        return f"- ({d['note']})" if c["is_fp32"] and c["quality"] else f"{NM} ({d['note']})"
    rel = "" if d["delta_pct"] is None else f" ({d['delta_pct']:+.2f}%)"
    return f"{d['delta']:+.4f}{rel}"


def _energy(c: dict, t: Table) -> str:
    e = c["energy"]
    if e["per_inference_mj"] is None:
        return t.nm(f"energy: {e['reason']}")
    net = "" if e["per_inference_net_mj"] is None else f", net {num(e['per_inference_net_mj'])}"
    return f"{num(e['per_inference_mj'])} mJ{net}"


def _vs(c: dict, key: str, unit: str, t: Table) -> str:
    v = c["vs_fp32"]
    if c["is_fp32"]:
        return "1 (FP32)" if c["status"] == "valid" else "FP32 run is INVALID"
    if v["excluded"]:
        return f"excluded: {v['excluded']}"
    if v[key] is None:
        return t.nm("energy ratio: energy is not measured on both runs" if "energy" in key
                    else "speedup: a latency is missing")
    star = " (forced)" if v["forced"] else ""
    sig = ""
    if key == "speedup_p50" and v["latency_significant"] is not None:
        sig = " significant" if v["latency_significant"] else " not significant (CIs overlap)"
    return f"{v[key]:.3f}{unit}{sig}{star} vs #{v['baseline_id']}"


def _status(c: dict) -> str:
    if c["status"] == "valid":
        return "valid"
    return f"INVALID: {'; '.join(c['invalid_reasons']) or 'no reason stored'}"


def model_tables(m: dict) -> list[Table]:
    cols = m["columns"]
    main = Table(f"{m['model']}: variants x boards", [
        "run", "board", "variant", "bits", "format", "status", "size", "size reduction vs FP32 file",
        "weights size reduction (quant.json)", "quality", "quality delta vs FP32", "p50 ms", "95% CI of median (ms)",
        "p90 ms", "peak RSS MB", "energy / inference", "speedup vs FP32 (p50)", "energy ratio vs FP32", "flags"],
        [], key="main")
    for c in cols:
        s = c["size"]
        red = pct(s["file_reduction_vs_fp32"]) if s["file_reduction_vs_fp32"] is not None else \
            main.nm("size reduction: no FP32 file of this model and format in the database")
        wred = pct(s["weights_size_reduction"]) if s["weights_size_reduction"] is not None else \
            ("-" if c["is_fp32"] else main.nm(f"weights size reduction of #{c['id']}: quant.json {s['quant_note']}"))
        flags = "; ".join(c["vs_fp32"]["flags"] + [f"board: {w}" for w in c["warnings"]]) or "-"
        bits = c["bits"] if c["bits_source"] in ("quant.json", "FILE.json") else f"{c['bits']} (by {c['bits_source']})"
        main.rows.append([f"#{c['id']}", c["device"], c["label"], bits, c["format"], _status(c),
                          _size_bytes(s["bytes"]), red, wred, _quality(c, main), _delta(c),
                          ms(c["latency_ms"]["p50"]), ci(c["latency_ms"]["ci95_median"]), ms(c["latency_ms"]["p90"]),
                          num(c["peak_rss_mb"], 1), _energy(c, main), _vs(c, "speedup_p50", "x", main),
                          _vs(c, "energy_ratio", "x", main), flags])
    if m["fp32_quality"]:
        main.notes.append(f"FP32 quality: {m['fp32_quality']['metric']} {num(m['fp32_quality']['value'], 4)} "
                          f"({m['fp32_quality_source']}).")
    else:
        main.notes.append(f"FP32 quality: {NM} ({m['fp32_quality_source']}).")
    sup = sum(c["superseded_runs"] for c in cols)
    if sup:
        main.notes.append(f"{sup} older re-run(s) of the same artifact, board, runtime and threads are not shown "
                          "(the newest run is).")
    p = m["pareto"]
    pareto = Table(f"{m['model']}: Pareto fronts (quality vs cost)", ["run", "board / envelope group", "variant",
                   "latency front", "size front", "energy front"], [], key="pareto")
    lat = {i for ids in p["latency"].values() for i in ids}
    en = {i for ids in p["energy"].values() for i in ids}
    for c in cols:
        if c["id"] in p["excluded"]:
            q = c["quality"]
            why = ("no quality measured" if not (q and q["value"] is not None) else
                   f"quality task {q['task']}, the front uses {p['task']}" if q["task"] != p["task"] else
                   "INVALID run" if c["status"] != "valid" else "its outputs differ from the host's")
            pareto.rows.append([f"#{c['id']}", c["group"], c["label"]] + [f"excluded ({why})"] * 3)
            continue
        en_cell = ("yes" if c["id"] in en else "no") if c["energy"]["per_inference_mj"] is not None else NM
        pareto.rows.append([f"#{c['id']}", c["group"], c["label"], "yes" if c["id"] in lat else "no",
                            "yes" if c["artifact_sha256"] in p["size"] else "no", en_cell])
    pareto.notes.append(f"Method: {p['method']}. Latency and energy fronts are per board and envelope; "
                        "size is per artifact.")
    out = [main, pareto]
    for b in m["bit_allocation"]:
        if not b["mixed"]:
            continue
        t = Table(f"{m['model']}: per-layer bit allocation of {b['label']} ({b['artifact_sha256'][:12]})",
                  ["layer", "kind", "weight bits", "granularity", "group size", "activations", "params", "bytes"],
                  [], key="bits")
        for layer in b["layers"] or []:
            t.rows.append([str(layer["name"]), str(layer["kind"]), str(layer["bits"]), str(layer["granularity"]),
                           str(layer["group_size"] or "-"), str(layer["activation"]), num(layer["params"]),
                           num(layer["bytes_quant"])])
        t.notes.append(f"average bits {num(b['avg_bits'])}; quant.json {b['source']}")
        out.append(t)
    uniform = [f"{b['label']} ({b['bits']}: {b['source']})" for b in m["bit_allocation"] if not b["mixed"]]
    if uniform:
        out[-1].notes.append("Not mixed precision (one bit width for every layer, or quant.json not available): "
                             + "; ".join(uniform))
    par = Table(f"{m['model']}: parity (PyTorch simulation vs exported file, from FILE.json)",
                ["variant", "format", "artifact", "exact", "max |diff|", "min cosine", "top-1 agreement", "samples",
                 "verdict", "on-device outputs"], [], key="parity")
    for r in m["parity"]:
        miss = f"{NM} ({r['note']})" if r["note"] else NM
        par.rows.append([r["label"], r["format"], r["artifact_sha256"][:12], str(r["exact"]),
                         num(r["max_abs"], 4) if r["max_abs"] is not None else miss,
                         num(r["cos_min"], 6) if r["cos_min"] is not None else miss,
                         num(r["top1_agree"], 4) if r["top1_agree"] is not None else miss,
                         num(r["samples"]) if r["samples"] is not None else miss,
                         r["verdict"] or (miss if r["note"] else NO_VERDICT),
                         r["on_device_note"]])
    out.append(par)
    env = Table(f"{m['model']}: environment fingerprint of each run",
                ["run", "board", "fingerprint", "CPU", "machine", "cores", "memory MB", "kernel", "OS", "python",
                 "runtime", "provider", "threads", "governor", "max freq kHz", "kernels on the board"], [], key="env")
    for c in cols:
        f = c["fingerprint"]
        env.rows.append([f"#{f['id']}", f["device"], (f["fingerprint_sha256"] or NM)[:12], _s(f["cpu_model"]),
                         _s(f["machine"]), _s(f["cpu_count"]), _s(f["mem_total_mb"]), _s(f["kernel"]),
                         _os(f["os"]), _s(f["python"]), f"{f['runtime']} {f['runtime_version']}", _s(f["provider"]),
                         _s(f["threads"]), _s(f["governor"]), _s(f["freq_max_khz"]), _kernels_text(f["kernels"])])
    env.notes.append("not measured here means the agent could not read it on the board (e.g. no cpufreq in a VM).")
    env.notes.append("kernels on the board: ONNX Runtime's integer kernels in the graph it optimized there, and the "
                     "weight ops it left float over dequantized tensors (not fused: dequantized on every run); for TFLite, "
                     "XNNPACK's partitions and the ops it left to LiteRT's built-in kernels.")
    out.append(env)
    return out


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {op}" for op, n in counts.items()) or "none"


def _kernels_text(k: dict) -> str:
    if k.get("kernels"):
        return (f"integer: {_counts(k['kernels'].get('integer') or {})}; "
                f"float over dequantized: {_counts(k['kernels']['float_on_dequantized'])}")
    if k.get("xnnpack"):
        x = k["xnnpack"]
        return f"XNNPACK: {x['nodes']} nodes in {x['partitions']} partitions; built-in: {_counts(x['builtin'])}"
    note = k.get("kernels_note") or k.get("xnnpack_note")
    return f"{NM} ({note})" if note else NM


def _s(v: Any) -> str:
    return NM if v is None or v == "" else str(v)


def _os(text: str | None) -> str:
    if not text:
        return NM
    return text.split("=", 1)[-1].strip('"') if text.startswith(("PRETTY_NAME=", "NAME=")) else text


def summary_table(doc: dict) -> Table:
    t = Table("Summary: INT8 and INT4 against FP32 per board (regenerated from the database)",
              ["model", "board", "bits", "variant", "run", "size reduction (file)", "size reduction (weights)",
               "quality delta", "latency reduction (p50)", "energy reduction"], [], key="summary")
    for r in doc["summary"]:
        qd = NM if r["quality_delta"] is None else (
            f"{r['quality_metric']} {r['quality_delta']:+.4f}"
            + ("" if r["quality_delta_pct"] is None else f" ({r['quality_delta_pct']:+.2f}%)"))
        if r["excluded"]:
            lat = en = f"excluded ({r['excluded']})"
        else:
            sig = "" if r["latency_significant"] is None else (
                ", significant" if r["latency_significant"] else ", not significant")
            lat = pct(r["latency_reduction"], "missing latency") + sig
            en = pct(r["energy_reduction"]) if r["energy_reduction"] is not None else t.nm(r["energy_note"])
        t.rows.append([r["model"], r["device"], r["bits"], r["label"], _versus(r),
                       pct(r["size_reduction"], "no FP32 file"), pct(r["weights_size_reduction"], "no quant.json"),
                       qd, lat + (" (forced)" if r["forced"] else ""), en])
    if not doc["summary"]:
        t.notes.append("No INT8 or INT4 runs in the database for these filters.")
    t.notes.append("Reductions are 1 - variant / FP32: positive means smaller, faster or less energy.")
    return t


def _versus(r: dict) -> str:
    return f"#{r['id']} vs " + ("no FP32 run" if r["baseline_id"] is None else f"#{r['baseline_id']}")


def flagged_table(doc: dict) -> Table:
    t = Table("Flagged runs (envelopes differ from the FP32 run, or INVALID)",
              ["run", "model", "board", "variant", "why", "ratios"], [], key="flagged")
    for f in doc["flagged"]:
        t.rows.append([f"#{f['id']}", f["model"], f["device"], f["label"], "; ".join(f["flags"]),
                       "shown, forced" if f["forced"] else ("excluded" if f["excluded"] else "-")])
    if not doc["flagged"]:
        t.notes.append("None: every compared pair has the same envelope.")
    for s in doc["skipped_runs"]:
        t.notes.append(f"run #{s['id']} ({s['device']}, {s['variant'] or s['artifact_sha256'][:12]}) {s['status']}: "
                       f"{s['error'] or 'no error stored'}; not in the report.")
    return t


def compare_tables(doc: dict) -> list[Table]:
    a, b, d = doc["a"], doc["b"], doc["diff"]
    rows = []
    for label, key, f in (("board", "device", str), ("variant", "variant", str), ("model", "model", str),
                          ("artifact", "artifact_sha256", lambda s: s[:12]), ("status", "status", str),
                          ("runtime", "runtime", str), ("runtime version", "runtime_version", str),
                          ("threads", "threads", str), ("timed runs", "n", str), ("p50 ms", "p50_ms", ms),
                          ("95% CI of median", "ci95_median", ci), ("p90 ms", "p90_ms", ms),
                          ("peak RSS MB", "peak_rss_mb", lambda v: num(v, 1)),
                          ("energy / inference mJ", "energy_mj", num),
                          ("fingerprint", "fingerprint_sha256", lambda s: (s or NM)[:12]),
                          ("board's warnings", "warnings", lambda w: "; ".join(w) or "-")):
        rows.append([label, f(a[key]), f(b[key])])
    energy = [r[0] for r in rows].index("energy / inference mJ")
    for side in (a, b):
        if side["energy_mj"] is None:
            rows[energy][1 if side is a else 2] = f"{NM} ({side['energy_reason'] or 'no reason stored'})"
    t1 = Table(f"Run #{a['id']} (A) vs run #{b['id']} (B)", ["", f"A #{a['id']}", f"B #{b['id']}"], rows,
               key="compare")
    sig = {True: "SIGNIFICANT: the 95% CIs of the medians do not overlap",
           False: "not significant: the 95% CIs of the medians overlap",
           None: f"{NM}: a CI of the median is missing (failed run, or too few timed runs)"}[d["significant"]]
    diff = Table("Difference (B - A)", ["quantity", "value"], [
        ["p50 B - A (ms)", num(d["p50_diff_ms"], 4)], ["p50 B / A", num(d["p50_ratio"], 4)],
        ["p90 B - A (ms)", num(d["p90_diff_ms"], 4)], ["peak RSS B - A (MB)", num(d["peak_rss_diff_mb"], 1)],
        ["energy B - A (mJ)", num(d["energy_diff_mj"], why="energy not measured on both runs")],
        ["significance of the p50 difference", sig]], key="diff")
    diff.notes.append(f"Method: {d['method']}.")
    if doc["envelope_flags"]:
        diff.notes.append("Envelopes differ, so the difference may not be due to the artifact: "
                          + "; ".join(doc["envelope_flags"]))
    if not doc["same_artifact"]:
        diff.notes.append("The two runs measured different artifacts.")
    return [t1, diff]
