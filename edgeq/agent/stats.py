"""Latency statistics and the validity rules of a timed run.

Percentiles use numpy's default (linear interpolation between order statistics), so they equal
`numpy.percentile` exactly. The 95% confidence interval of the median is distribution-free: the
order-statistic interval [x_(j), x_(k)] from the Binomial(n, 1/2) distribution of the number of
samples below the true median, with the narrowest symmetric ranks giving coverage >= 95%.
It never averages away a slow tail and never drops a sample.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CI_METHOD = "order-statistic (binomial, distribution-free), coverage >= 95%"


def _binom_pmf_half(i: int, n: int) -> float:
    """P(X = i) for X ~ Binomial(n, 1/2), in log space so large n does not underflow."""
    return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0))


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) such that [x_(lo), x_(hi)] covers the median with >= `confidence`.

    With 1-based ranks r and n + 1 - r the coverage is 1 - 2 P(B <= r - 1), B ~ Bin(n, 1/2); the
    largest r that keeps the coverage is taken. None when n is too small (n < 6 at 95%).
    """
    r, cdf = 0, 0.0  # cdf = P(B <= r - 1) for the candidate r + 1
    while r + 1 <= (n + 1) // 2:
        cdf_next = cdf + _binom_pmf_half(r, n)
        if 1.0 - 2.0 * cdf_next < confidence - 1e-12:
            break
        r, cdf = r + 1, cdf_next
    if r == 0:
        return None
    return r - 1, n - r


def summarize(latencies_ms: Sequence[float]) -> dict:
    """p50/p90/p99/mean/std/min/max and the 95% CI of the median of raw latencies (ms)."""
    x = np.asarray(latencies_ms, dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "std": None,
                "min": None, "max": None, "ci95_median": [None, None], "ci_method": CI_METHOD}
    p50, p90, p99 = (float(v) for v in np.percentile(x, [50, 90, 99]))
    ranks = median_ci_ranks(int(x.size))
    if ranks is None:
        ci = [None, None]
    else:
        s = np.sort(x)
        ci = [float(s[ranks[0]]), float(s[ranks[1]])]
    return {
        "n": int(x.size), "p50": p50, "p90": p90, "p99": p99,
        "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()), "max": float(x.max()),
        "ci95_median": ci, "ci_method": CI_METHOD,
    }


def validity(n_runs: int, seconds: float, min_runs: int, min_seconds: float) -> list[str]:
    """Reasons a timed run is INVALID (empty list: valid). Both minimums must be met."""
    reasons = []
    if n_runs < min_runs:
        reasons.append(f"only {n_runs} timed runs, the minimum is {min_runs}")
    if seconds < min_seconds:
        reasons.append(f"timed window {seconds:.3f} s is shorter than the minimum {min_seconds} s")
    return reasons


def is_stable(window: Sequence[float], previous: Sequence[float], tolerance: float) -> bool:
    """Warm-up is stable when the median of the last window is within `tolerance` of the one before."""
    if not window or not previous:
        return False
    a, b = float(np.median(window)), float(np.median(previous))
    return abs(a - b) <= tolerance * max(b, 1e-9)
