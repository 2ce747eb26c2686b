"""Comparisons between measured columns: envelopes, ratios vs FP32, Pareto fronts, significance.

Every number here is a ratio or difference of two stored measurements; nothing is estimated,
interpolated or filled in. Two runs are compared only when their envelopes match (same threads,
runtime and version, provider, CPU governor, board and kernel, and both runs VALID); otherwise the
comparison is flagged and left out unless `force` is set, in which case it is shown and marked.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from .gather import Column, describe_setting

SIGNIFICANCE_METHOD = ("two medians differ significantly when their 95% confidence intervals do not "
                       "overlap (the agent's distribution-free order-statistic CI of each median); "
                       "non-overlap is a conservative test at about the 95% level")
PARETO_METHOD = ("a point is on the front when no other point of the same group is at least as good in "
                 "quality and at least as cheap, and strictly better in one of the two")
_FP_KEYS = ("board", "cpu_model", "machine", "kernel", "freq_max_khz")


def governors(fingerprint: dict | None) -> str | None:
    """The distinct CPU governors of a fingerprint, e.g. 'performance' or 'ondemand,performance'."""
    gov = (fingerprint or {}).get("governor") or {}
    values = sorted({v for v in gov.values() if v}) if isinstance(gov, dict) else [str(gov)]
    return ",".join(values) or None


def envelope(col: Column) -> dict[str, Any]:
    """What must match for two runs to be compared."""
    r = col.result
    fp = r.fingerprint or {}
    env = {"device": r.device, "threads": r.threads, "runtime": r.runtime,
           "runtime_version": r.runtime_version, "provider": r.provider, "governor": governors(fp)}
    for k in _FP_KEYS:
        v = fp.get(k)
        env[k] = ",".join(sorted({str(x) for x in v.values() if x})) if isinstance(v, dict) else v
    return env


def outputs_differ(col: Column) -> dict | None:
    """The run's output check (`agent/outputs.py`) when the board's outputs differ from the host's: its timing is of
    a computation that is not the model's."""
    check = (col.result.result or {}).get("output_check") or {}
    return check if check.get("compared") and not check.get("agrees") else None


def invalid_flags(col: Column) -> list[str]:
    """Why a run cannot be compared whatever its envelope: not VALID, or its outputs differ from the host's."""
    out = []
    if col.result.status != "valid":
        reasons = "; ".join(col.result.invalid_reasons or []) or "no reason stored"
        out.append(f"run #{col.id} is {col.result.status.upper()}: {reasons}")
    differ = outputs_differ(col)
    if differ:
        out.append(f"run #{col.id}'s outputs differ from {differ['reference']} (cosine {differ['cos_min']:.4f}): the "
                   "board's runtime computes something else than the file")
    return out


def envelope_diffs(a: Column, b: Column) -> list[str]:
    """Why `a` and `b` are not apples to apples (empty: comparable)."""
    ea, eb = envelope(a), envelope(b)
    out = [f"{k} differs: {ea[k]} (#{a.id}) vs {eb[k]} (#{b.id})" for k in ea if ea[k] != eb[k]]
    return out + invalid_flags(a) + (invalid_flags(b) if b is not a else [])


def envelope_group(col: Column, force: bool) -> str:
    """The group within which latency / energy Pareto fronts are drawn."""
    if force:
        return col.device
    e = envelope(col)
    return (f"{e['device']} ({e['runtime']} {e['runtime_version']}, {e['threads']} thr, "
            f"governor {e['governor'] or 'n/a'})")


def baseline_for(col: Column, columns: Sequence[Column]) -> Column | None:
    """The FP32 run of the same model, format, signature and input dims on the same board, preferring a matching
    envelope."""
    cands = [c for c in columns if c.is_fp32 and c.model == col.model and c.fmt == col.fmt and c.device == col.device
             and c.result.runtime == col.result.runtime and c.signature == col.signature and c.dims == col.dims]
    if not cands:
        return None
    return min(cands, key=lambda c: (len(envelope_diffs(col, c)), -c.id))


def ci_overlap(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool | None:
    """True if two closed intervals overlap, None if either is unknown."""
    if None in a or None in b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def ratios_vs_fp32(col: Column, base: Column | None, force: bool) -> dict[str, Any]:
    """Speedup (FP32 p50 / p50, and p90) and energy ratio (energy / FP32 energy) on the same board."""
    out: dict[str, Any] = {"baseline_id": None, "speedup_p50": None, "speedup_p90": None,
                           "latency_significant": None, "energy_ratio": None, "energy_net_ratio": None,
                           "flags": [], "excluded": None, "forced": False}
    if base is None:
        out["excluded"] = "no FP32 run of this model and format on this board and runtime"
        return out
    out["baseline_id"] = base.id
    flags = envelope_diffs(col, base)
    out["flags"] = flags
    if flags and not force:
        out["excluded"] = "envelope differs from the FP32 run (see flags; --force compares anyway)"
        return out
    out["forced"] = bool(flags)
    a, b = col.result, base.result
    out["speedup_p50"] = ratio(b.p50_ms, a.p50_ms)
    out["speedup_p90"] = ratio(b.p90_ms, a.p90_ms)
    overlap = ci_overlap((a.ci_low_ms, a.ci_high_ms), (b.ci_low_ms, b.ci_high_ms))
    out["latency_significant"] = None if overlap is None else not overlap
    out["energy_ratio"] = ratio(a.energy_mj, b.energy_mj)
    out["energy_net_ratio"] = ratio(a.energy_net_mj, b.energy_net_mj)
    return out


def quality_delta(col: Column, ref) -> dict[str, Any]:
    """value - FP32 value (and relative %) when both are measured the same way (task, data, windows, count)."""
    q = col.quality
    if q is None or q.value is None:
        return {"delta": None, "delta_pct": None, "note": "no evaluation of this file's sha256"}
    if ref is None or ref.value is None:
        return {"delta": None, "delta_pct": None, "note": "no FP32 quality to compare with"}
    if q.setting != ref.setting:
        return {"delta": None, "delta_pct": None, "note": f"not comparable: FP32 was evaluated as "
                f"{describe_setting(ref.setting)}, this file as {describe_setting(q.setting)}"}
    d = q.value - ref.value
    return {"delta": d, "delta_pct": None if ref.value == 0 else 100.0 * d / abs(ref.value), "note": None}


def pareto_front(points: Iterable[tuple[Any, float, float]], higher_is_better: bool) -> set:
    """Keys of the non-dominated points among (key, quality, cost); cost is always lower-is-better."""
    pts = list(points)
    sign = 1.0 if higher_is_better else -1.0
    front = set()
    for k, q, c in pts:
        dominated = any(sign * q2 >= sign * q and c2 <= c and (sign * q2 > sign * q or c2 < c)
                        for k2, q2, c2 in pts if k2 != k)
        if not dominated:
            front.add(k)
    return front


def latency_diff(a, b) -> dict[str, Any]:
    """B vs A for two stored results (store.ResultRecord): differences, ratios and significance."""
    overlap = ci_overlap((a.ci_low_ms, a.ci_high_ms), (b.ci_low_ms, b.ci_high_ms))
    diff = lambda x, y: None if x is None or y is None else y - x  # noqa: E731
    return {
        "p50_diff_ms": diff(a.p50_ms, b.p50_ms), "p90_diff_ms": diff(a.p90_ms, b.p90_ms),
        "p50_ratio": ratio(b.p50_ms, a.p50_ms),
        "peak_rss_diff_mb": diff(a.peak_rss_mb, b.peak_rss_mb),
        "energy_diff_mj": diff(a.energy_mj, b.energy_mj),
        "ci_overlap": overlap,
        "significant": None if overlap is None else not overlap,
        "method": SIGNIFICANCE_METHOD,
    }
