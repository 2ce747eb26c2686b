"""Bit allocation under a size budget: closed-form rate-distortion start, then integer refinement.

Pure arithmetic over per-layer tables (no torch): each layer offers a few `Choice`s (bits, exact
stored bytes, predicted loss increase). The allocator

1. solves the continuous problem in closed form (reverse water-filling, as in Hasan 2024): with
   distortion D_i(b) ~ n_i * s_i * var_i * 2^(-2b), the optimum is
   b_i = b_avg + 0.5 * log2(s_i * var_i / G), G the parameter-weighted geometric mean of s * var,
   clipped to the allowed range with the offset re-solved so the average stays b_avg;
2. snaps that to the allowed set and repairs it with exact bytes and the measured/predicted
   distortion table: downgrade the cheapest-to-lose layer while over budget, then upgrade the layer
   with the best loss reduction per byte while it fits;
3. independently solves the multiple-choice knapsack two more ways: Lagrangian relaxation
   (min D + lambda*bytes, bisection on lambda) and dynamic programming over the budget cut into
   `DP_BINS` slots (sizes rounded up, so its plan always fits), each followed by the same greedy
   fill of the leftover bytes, and keeps whichever plan predicts the least loss.

Never raises for internal reasons; a budget below the smallest possible plan is an EdgeqError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeqError

DP_BINS = 4096


@dataclass(frozen=True)
class Choice:
    """One way to store a layer: its weight bit-width, exact stored bytes and predicted loss increase."""

    bits: int
    bytes: int
    loss: float


@dataclass
class LayerOptions:
    name: str
    params: int
    importance: float  # sensitivity x weight variance (Hasan's score)
    choices: list[Choice]  # sorted by bytes, at least one
    fixed: bool = False  # forced (e.g. activation outliers): only its largest choice


@dataclass
class Allocation:
    picks: dict[str, Choice]
    closed_form_bits: dict[str, float]
    total_bytes: int
    layer_bytes: int
    predicted_loss: float
    strategy: str  # which solver's plan was kept
    details: dict = field(default_factory=dict)

    @property
    def avg_bits(self) -> float:
        return self.details.get("avg_bits", float("nan"))


def closed_form_bits(layers: list[LayerOptions], avg_bits: float, lo: float, hi: float) -> dict[str, float]:
    """Reverse water-filling: b_i = b_avg + 0.5*log2(imp_i / G) clipped to [lo, hi], parameter-weighted mean = b_avg."""
    if not layers:
        return {}
    total = sum(layer.params for layer in layers)
    logs = {layer.name: 0.5 * math.log2(max(layer.importance, 1e-30)) for layer in layers}
    g = sum(layer.params * logs[layer.name] for layer in layers) / total
    target = min(max(avg_bits, lo), hi)

    def mean_bits(theta: float) -> float:
        return sum(layer.params * min(max(target + theta + logs[layer.name] - g, lo), hi) for layer in layers) / total

    a, b = -64.0, 64.0  # the clipped mean is monotone in the offset theta
    for _ in range(100):
        mid = 0.5 * (a + b)
        if mean_bits(mid) < target:
            a = mid
        else:
            b = mid
    theta = 0.5 * (a + b)
    return {layer.name: min(max(target + theta + logs[layer.name] - g, lo), hi) for layer in layers}


def allocate(layers: list[LayerOptions], fixed_bytes: int, max_total_bytes: float) -> Allocation:
    """Choose one `Choice` per layer so fixed_bytes + sum(bytes) <= max_total_bytes, minimising total loss."""
    budget = max_total_bytes - fixed_bytes
    options = {layer.name: (layer.choices[-1:] if layer.fixed else sorted(layer.choices, key=lambda c: c.bytes))
               for layer in layers}
    smallest = sum(opts[0].bytes for opts in options.values())
    if smallest > budget:
        raise EdgeqError(
            f"--budget: too small: the smallest plan (every layer at its lowest allowed bit-width, forced "
            f"layers at 8) needs "
            f"{fixed_bytes + smallest:,} bytes, over the budget of {int(max_total_bytes):,} bytes; "
            "raise the budget or allow fewer bits (--bits)")
    params = sum(layer.params for layer in layers)
    lo = min(c.bits for o in options.values() for c in o)
    hi = max(c.bits for o in options.values() for c in o)
    # average stored bits per parameter the budget allows, minus the scale overhead of a mid choice
    overhead = sum(o[len(o) // 2].bytes * 8 - o[len(o) // 2].bits * layer.params
                   for layer, o in ((layer, options[layer.name]) for layer in layers)) / max(params, 1)
    avg = budget * 8 / max(params, 1) - overhead
    cf = closed_form_bits([layer for layer in layers if not layer.fixed], avg, lo, hi)

    start = {}
    for layer in layers:
        opts = options[layer.name]
        if layer.name in cf:
            start[layer.name] = min(range(len(opts)), key=lambda k: (abs(opts[k].bits - cf[layer.name]), opts[k].bits))
        else:
            start[layer.name] = 0
    plans = {
        "closed-form+greedy": _greedy(options, _repair(options, start, budget), budget),
        "lagrangian+greedy": _greedy(options, _lagrangian(options, budget), budget),
    }
    dp = _knapsack(options, budget)
    if dp is not None:
        plans["knapsack-dp+greedy"] = _greedy(options, dp, budget)
    strategy, pick = min(plans.items(), key=lambda kv: (_loss(options, kv[1]), kv[0]))
    picks = {name: options[name][k] for name, k in pick.items()}
    layer_bytes = sum(c.bytes for c in picks.values())
    details = {
        "avg_bits": sum(c.bytes * 8 for c in picks.values()) / max(params, 1),
        "closed_form_avg_bits": avg,
        "plans_predicted_loss": {k: _loss(options, v) for k, v in plans.items()},
    }
    return Allocation(picks, cf, fixed_bytes + layer_bytes, layer_bytes, _loss(options, pick), strategy, details)


def _loss(options, pick) -> float:
    return sum(options[n][k].loss for n, k in pick.items())


def _size(options, pick) -> int:
    return sum(options[n][k].bytes for n, k in pick.items())


def _repair(options, pick: dict, budget: float) -> dict:
    """Downgrade the layer whose loss grows least per byte saved until the plan fits."""
    pick = dict(pick)
    while _size(options, pick) > budget:
        best = None
        for n, k in pick.items():
            if k == 0:
                continue
            cur, down = options[n][k], options[n][k - 1]
            saved = cur.bytes - down.bytes
            cost = (down.loss - cur.loss) / max(saved, 1)
            if best is None or cost < best[0]:
                best = (cost, n)
        assert best is not None, "the smallest plan fits (checked before)"
        pick[best[1]] -= 1
    return pick


def _greedy(options, pick: dict, budget: float) -> dict:
    """Upgrade the layer with the largest loss reduction per extra byte while the plan still fits."""
    pick = dict(pick)
    slack = budget - _size(options, pick)
    while True:
        best = None
        for n, k in pick.items():
            cur = options[n][k]
            for j in range(k + 1, len(options[n])):  # any larger choice, not only the next one
                up = options[n][j]
                extra = up.bytes - cur.bytes
                gain = cur.loss - up.loss
                if extra <= slack and gain > 0:
                    rate = gain / max(extra, 1)
                    if best is None or rate > best[0]:
                        best = (rate, n, j, extra)
        if best is None:
            return pick
        _, n, j, extra = best
        pick[n] = j
        slack -= extra


def _lagrangian(options, budget: float) -> dict:
    """Per layer argmin loss + lam*bytes, with the smallest lam (bisection, log scale) whose plan fits."""
    def solve(lam: float) -> dict:
        return {n: min(range(len(o)), key=lambda k: (o[k].loss + lam * o[k].bytes, o[k].bytes)) for n, o in options.items()}

    losses = [abs(c.loss) for o in options.values() for c in o] + [1e-30]
    lo, hi = 0.0, max(losses) * 1e6 + 1.0
    if _size(options, solve(lo)) <= budget:
        return solve(lo)
    for _ in range(200):
        mid = math.sqrt(max(lo, 1e-300) * hi) if lo > 0 else hi / 1e12
        if _size(options, solve(mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    pick = solve(hi)
    return _repair(options, pick, budget)  # fp safety: lam large enough always reaches the smallest plan


def _knapsack(options, budget: float, bins: int = DP_BINS) -> dict | None:
    """Multiple-choice knapsack by dynamic programming on sizes rounded up to budget/bins (None if nothing fits)."""
    if budget <= 0:
        return None
    unit = budget / bins
    names = list(options)
    inf = float("inf")
    dp = np.full(bins + 1, inf)
    dp[0] = 0.0
    dp = np.minimum.accumulate(dp)
    picks = np.zeros((len(names), bins + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(bins + 1, inf)
        arg = np.zeros(bins + 1, dtype=np.int16)
        for k, c in enumerate(options[n]):
            cost = math.ceil(c.bytes / unit - 1e-9)
            if cost > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[cost:] = dp[: bins + 1 - cost] + c.loss
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp, picks[i] = new, arg
    if not np.isfinite(dp[bins]):
        return None
    pick, cap = {}, bins
    best_cap = int(np.argmin(dp))  # dp is not monotone (exact sizes); take the best reachable capacity
    cap = best_cap
    for i in range(len(names) - 1, -1, -1):
        k = int(picks[i, cap])
        pick[names[i]] = k
        cap -= math.ceil(options[names[i]][k].bytes / unit - 1e-9)
    assert cap >= 0
    return pick
