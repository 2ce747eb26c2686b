"""GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error feedback.

Hessian from calibration activations, relative damping, lazy block updates and optional
act-order. With act-order, group scales are fixed up front from the original weight (static
groups) so a group's columns still share one scale after the permutation; without it, each
group's scale is chosen when GPTQ reaches the group, from the already-updated weights.
"""

from __future__ import annotations

import contextlib

import torch

from .methods import LayerStats, register_method, weight_group_size
from .primitives import compute_qparams, dequantize, quantize


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: GPTQ's column loop is thousands of vector-sized ops, which torch's
    intra-op threads only slow down (SmolLM2's down_proj: 1.7 s on one thread, 4.4 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@register_method("gptq", needs_hessian=True)
def gptq(weight: torch.Tensor, rule, stats: LayerStats, recipe):
    with one_thread():
        return _gptq(weight, rule, stats, recipe)


def _gptq(weight: torch.Tensor, rule, stats: LayerStats, recipe):
    spec, opts = rule.weight, recipe.gptq
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    H = stats.hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = weight_group_size(spec)

    def params(w: torch.Tensor):
        scale, zp = compute_qparams(w, spec.bits, spec.symmetric, "channel" if gs else spec.granularity, None,
                                    rule.gamma, spec.scale_dtype, full_range=spec.range == "full")
        if scale.shape[0] == 1:
            scale, zp = scale.expand(rows, 1), zp.expand(rows, 1)
        return scale, zp

    n_groups = 1 if gs is None else -(-cols // gs)
    scale = torch.empty(rows, n_groups)
    zp = torch.empty(rows, n_groups, dtype=torch.int16)
    static_groups = gs is None or opts.act_order
    if gs is None:
        scale[:], zp[:] = params(W)
    elif static_groups:
        for g in range(n_groups):
            scale[:, g : g + 1], zp[:, g : g + 1] = params(W[:, g * gs : (g + 1) * gs])
    done = torch.zeros(n_groups, dtype=torch.bool)

    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += opts.damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    B = opts.block_size
    # error feedback can push a column past the absmax its scale came from, down to -2^(b-1); RTN never gets there.
    # 8-bit narrow grids stop at -127: LiteRT's int8 weights are [-127, 127] (its int4 weights take -8, so 4-bit
    # narrow grids keep the full signed range)
    floor8 = spec.symmetric and spec.bits == 8 and spec.range == "narrow"
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = 0 if gs is None else col // gs
            if not static_groups and not done[g]:
                # natural order: this column starts group g; its later columns are partly in W1, partly beyond
                span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : min(gs, cols - col)]
                scale[:, g : g + 1], zp[:, g : g + 1] = params(span)
                done[g] = True
            s, z = scale[:, g : g + 1], zp[:, g : g + 1]
            w = W1[:, i : i + 1]
            q = quantize(w, s, z, spec.bits, spec.symmetric)
            if floor8:
                q = q.clamp_min(-127.0)
            Q[:, i1 + i] = q[:, 0]
            err = (w - dequantize(q, s, z)) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return Q, scale, zp
