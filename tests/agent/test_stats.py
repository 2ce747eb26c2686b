"""Statistics: numpy-equal percentiles, a correct median CI, and the INVALID rule."""

import math

import numpy as np
import pytest

from edgeq.agent import stats


def test_percentiles_equal_numpy_on_10000_samples():
    x = np.random.default_rng(7).lognormal(mean=0.0, sigma=0.6, size=10_000)
    s = stats.summarize(x)
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert s[key] == np.percentile(x, q)
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
    assert (s["min"], s["max"], s["n"]) == (x.min(), x.max(), 10_000)
    lo, hi = s["ci95_median"]
    assert lo <= s["p50"] <= hi


@pytest.mark.parametrize("n", [6, 10, 25, 50, 101, 1000])
def test_median_ci_ranks_have_exact_binomial_coverage(n):
    lo, hi = stats.median_ci_ranks(n)
    assert hi == n - 1 - lo
    cover = sum(math.comb(n, i) for i in range(lo + 1, hi + 1)) / 2 ** n
    assert cover >= 0.95
    if lo + 1 <= hi - 1:  # one rank narrower would fall below 95%
        narrower = sum(math.comb(n, i) for i in range(lo + 2, hi)) / 2 ** n
        assert narrower < 0.95


def test_median_ci_too_few_samples_is_null():
    assert stats.median_ci_ranks(5) is None
    assert stats.summarize([1.0, 2.0, 3.0])["ci95_median"] == [None, None]


def test_median_ci_covers_true_median_about_95_percent():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(400):
        lo, hi = stats.summarize(rng.exponential(size=60))["ci95_median"]
        hits += lo <= math.log(2) <= hi
    assert 0.92 <= hits / 400 <= 0.995


def test_under_minimum_count_or_duration_is_invalid():
    assert stats.validity(50, 1.0, 50, 1.0) == []
    assert "minimum is 50" in stats.validity(49, 2.0, 50, 1.0)[0]
    assert "shorter than the minimum" in stats.validity(500, 0.99, 50, 1.0)[0]
    assert len(stats.validity(3, 0.1, 50, 1.0)) == 2
