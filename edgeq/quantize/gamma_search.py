"""The range multiplier gamma (Hasan), searched per layer: method `rtn-gamma`.

For each layer, RTN is tried on the grid of gamma * range for gamma in a grid over
[gamma_min, rule.gamma] and the gamma with the least output error on the calibration data is
kept. Output error uses the layer's input Hessian: E||X (W - W_q)^T||^2 = tr(dW H dW^T), so no
extra forward passes are needed. The chosen gamma is implied by the stored scales (scale =
gamma * absmax / qmax); the rule's gamma is the upper end of the search. In QAT (`lsq`), scales
are learnable, which makes gamma learnable: gamma only sets the starting point.
"""

from __future__ import annotations

import torch

from .methods import LayerStats, register_method, rtn

GAMMA_MIN = 0.5
GAMMA_STEPS = 16


def output_error(weight: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (weight - wq).float()
    return float(torch.sum((d @ hessian.float()) * d))


@register_method("rtn-gamma", needs_hessian=True)
def rtn_gamma(weight: torch.Tensor, rule, stats: LayerStats, recipe):
    """RTN with gamma searched per layer to minimise the layer's output MSE on calibration data."""
    import dataclasses

    from .primitives import dequantize

    gs = rule.weight.group_size if rule.weight.granularity == "group" else None
    best, best_err = None, float("inf")
    hi = rule.gamma
    for g in torch.linspace(min(GAMMA_MIN, hi), hi, GAMMA_STEPS).tolist():
        q, scale, zp = rtn(weight, dataclasses.replace(rule, gamma=float(g)), stats, recipe)
        err = output_error(weight, dequantize(q, scale, zp, gs), stats.hessian)
        if err < best_err:
            best, best_err = (q, scale, zp), err
    return best
