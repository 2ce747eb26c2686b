"""PB-LLM (Shang et al. 2023): partially binarized weights.

A fraction f of each layer's weights (element-wise, chosen by magnitude |w| or by the Hessian
criterion w^2 / [H^-1]_jj^2) is salient and kept at 8 bits; the rest is binarized to
+-alpha with alpha* = mean |w| over the non-salient weights of the row (the optimal binary scale).

Representation (see docs/architecture.md, "PB-LLM in the QDIR"): the salient 8-bit grid of a row
is chosen so that +-alpha lies on it exactly: scale = alpha / k with k = floor(127 alpha / max|w_salient|)
(1 <= k <= 127). Then the whole row is an ordinary INT8 symmetric per-channel row: binarized
weights are the integers +-k, salient weights any integer in [-127, 127]. The QDIR layer is a plain
`w8s-c` QuantLinear whose dequantized values equal the PB-LLM weights exactly, so ONNX/TFLite carry
it unchanged (as INT8, the nearest supported form: runtimes have no 1-bit + mask kernels). Only when
max|w_salient| > 127 alpha (rare) is the grid max|w_salient| / 127 and the binary level rounded to
the nearest multiple (counted in quant.json as `rows_binary_rounded`).

Methods: `pb-llm` (PB-GPTQ: GPTQ error feedback over the fixed partial-binary grid) and
`pb-llm-rtn` (no error feedback); QAT layer `pb-llm` (salient weights frozen, binarized latent
weights trained through a straight-through sign, alpha frozen so the salient grid stays exact).
Bit accounting (`pb_accounting`): bits/weight = (1 - f) * 1 + f * 8 + mask + per-row scales.
"""

from __future__ import annotations

import math

import torch

from ..errors import EdgeqError
from .gptq import one_thread
from .methods import METHOD_RECORDS, LayerStats, register_method
from .qat import QATLayer, register_qat

QMAX = 127


def _hinv_diag(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(H))).to(torch.float32)


def salient_mask(w: torch.Tensor, fraction: float, criterion: str = "magnitude", hessian: torch.Tensor | None = None,
                 damp: float = 0.01) -> torch.Tensor:
    """Boolean [out, in]: the round(fraction * numel) most salient weights of the whole matrix."""
    n_sal = round(fraction * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    if n_sal == 0:
        return mask.reshape(w.shape)
    if criterion == "hessian":
        if hessian is None:
            raise EdgeqError("pb-llm: the hessian criterion needs calibration data")
        score = w.pow(2) / _hinv_diag(hessian, damp).pow(2)[None, :]
    elif criterion == "magnitude":
        score = w.abs()
    else:
        raise EdgeqError(f"pb-llm: criterion {criterion!r} is not magnitude or hessian")
    mask[torch.topk(score.reshape(-1), n_sal).indices] = True
    return mask.reshape(w.shape)


def pb_grid(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-row INT8 scale [out, 1] and binary level k [out, 1] with +-k*scale = +-alpha*; rows rounded."""
    nonsal = ~mask
    count = nonsal.sum(dim=1, keepdim=True).clamp_min(1)
    alpha = (w.abs() * nonsal).sum(dim=1, keepdim=True) / count
    alpha = alpha.clamp_min(1e-12)
    m = (w.abs() * mask).amax(dim=1, keepdim=True)
    k = torch.floor(QMAX * alpha / m.clamp_min(1e-30)).clamp(1, QMAX)
    scale = alpha / k
    too_wide = m > QMAX * alpha  # salient range beyond 127 alpha: fall back to the salient grid, round alpha
    if bool(too_wide.any()):
        wide_scale = m / QMAX
        scale = torch.where(too_wide, wide_scale, scale)
        k = torch.where(too_wide, torch.round(alpha / wide_scale).clamp(1, QMAX), k)
    return scale.float(), k.float(), int(too_wide.sum())


def pb_quantize(w: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Integers on the row grid: salient -> round(w / scale), others -> +-k."""
    sal = torch.clamp(torch.round(w / scale), -QMAX, QMAX)
    return torch.where(mask, sal, torch.where(w >= 0, k, -k))


def pb_gptq(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, k: torch.Tensor,
            damp: float = 0.01, block: int = 128, latent: bool = False):
    """GPTQ column sweep over the fixed partial-binary grid (PB-GPTQ); returns the integers, and with `latent`
    also each column as it was when quantized (after the error feedback of the columns before it: the
    integers are `pb_quantize` of these values)."""
    W = W.detach().float().clone()
    rows, cols = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    L = torch.zeros_like(W) if latent else None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i : i + 1]
            q = pb_quantize(w, mask[:, i1 + i : i1 + i + 1], scale, k)
            Q[:, i1 + i] = q[:, 0]
            if latent:
                L[:, i1 + i] = w[:, 0]
            err = (w - q * scale) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (Q, L) if latent else Q


def _check_rule(rule, method: str) -> None:
    spec = rule.weight
    if spec.bits != 8 or not spec.symmetric or spec.granularity != "channel":
        form = f"{'' if spec.symmetric else 'a'}symmetric {spec.bits}-bit {spec.granularity}"
        raise EdgeqError(f"method {method!r}: the rule matching {rule.match!r} stores {form} weights; PB-LLM needs "
                         "weight = { bits = 8, symmetric = true, granularity = 'channel' } (its rows are INT8 "
                         "per-channel rows; the pb-llm preset has it)")


def _pb(weight: torch.Tensor, rule, stats: LayerStats, recipe, gptq: bool):
    _check_rule(rule, rule.method)
    opts = recipe.pbllm
    w = weight.detach().float()
    mask = salient_mask(w, opts.salient_fraction, opts.criterion, stats.hessian, opts.damp)
    scale, k, _ = pb_grid(w, mask)
    if gptq:
        with one_thread():
            q = pb_gptq(w, stats.hessian, mask, scale, k, opts.damp)
    else:
        q = pb_quantize(w, mask, scale, k)
    return q, scale, torch.zeros_like(scale, dtype=torch.int16)


@register_method("pb-llm", needs_hessian=True)
def pb_llm(weight, rule, stats, recipe):
    """PB-GPTQ: salient 8-bit + binarized rest, with GPTQ error feedback."""
    return _pb(weight, rule, stats, recipe, gptq=True)


@register_method("pb-llm-rtn", needs_hessian=True)
def pb_llm_rtn(weight, rule, stats, recipe):
    """Partial binarization without error feedback (the baseline PB-GPTQ is compared with)."""
    return _pb(weight, rule, stats, recipe, gptq=False)


def binary_entropy(f: float) -> float:
    return 0.0 if f <= 0 or f >= 1 else -(f * math.log2(f) + (1 - f) * math.log2(1 - f))


def pb_accounting(rows: int, cols: int, fraction: float) -> dict:
    """Bits per weight of PB-LLM storage, mask included.

    Stored per weight: 1 bit (binarized) or 8 bits (salient), plus the mask. The mask is counted
    as a dense bitmap (1 bit/weight, what a simple kernel reads); the entropy bound H(f) is given
    too. Per row: alpha (fp32) and k (int8). The file edgeq writes holds INT8 rows (8 bits/weight).
    """
    n = rows * cols
    n_sal = round(fraction * n)
    payload = (n - n_sal) * 1 + n_sal * 8
    per_row = rows * (32 + 8)
    return {
        "salient_fraction": fraction,
        "salient_weights": n_sal,
        "bits_per_weight": round((payload + n + per_row) / n, 4),
        "bits_per_weight_entropy_mask": round((payload + n * binary_entropy(fraction) + per_row) / n, 4),
        "bits_per_weight_no_mask": round((payload + per_row) / n, 4),
        "mask": "dense bitmap, 1 bit per weight (entropy bound also given)",
        "stored_form": "int8 per-channel symmetric rows (binary = +-k on scale alpha/k): exact, 8 bits per weight in the file",
    }


def _record(m, recipe) -> dict:
    rows = m.decision.shape[0]
    cols = math.prod(m.decision.shape[1:])
    rec = pb_accounting(rows, cols, recipe.pbllm.salient_fraction)
    rec["criterion"] = recipe.pbllm.criterion
    if m.decision.method == "qat-pb-llm":
        rec["qat_init"] = recipe.pbllm.qat_init
    return rec


for _name in ("pb-llm", "pb-llm-rtn", "qat-pb-llm"):
    METHOD_RECORDS[_name] = _record


@register_qat("pb-llm")
class PBLLMQATLinear(QATLayer):
    """PB-LLM QAT: salient integers frozen, binarized weights' latent floats trained (straight-through sign)."""

    method = "pb-llm"

    @staticmethod
    def needs_hessian(options: dict) -> bool:
        return options.get("criterion", "hessian") == "hessian" or options.get("qat_init", "gptq") == "gptq"

    def __init__(self, name, linear, rule, act_qparams=None, options=None):
        super().__init__(name, linear, rule, act_qparams)
        _check_rule(rule, self.method)
        options = options or {}
        w = linear.weight.detach().float()
        damp = float(options.get("damp", 0.01))
        mask = salient_mask(w, float(options.get("salient_fraction", 0.1)), options.get("criterion", "hessian"),
                            options.get("hessian"), damp)
        scale, k, _ = pb_grid(w, mask)
        latent = w
        if options.get("qat_init", "gptq") == "gptq":
            # start from PB-GPTQ: its integers are pb_quantize of the error-compensated columns, so training from
            # those values starts exactly at the PTQ result (salient integers frozen there, signs learnable)
            with one_thread():
                _, latent = pb_gptq(w, options["hessian"], mask, scale, k, damp, latent=True)
        self.register_buffer("mask", mask)
        self.register_buffer("scale", scale)
        self.register_buffer("k", k)
        self.register_buffer("q_salient", pb_quantize(latent, mask, scale, k).to(torch.int8))
        self.weight = torch.nn.Parameter(latent.clone())

    def _q(self) -> torch.Tensor:
        sign = torch.where(self.weight >= 0, 1.0, -1.0) + (self.weight - self.weight.detach())
        return torch.where(self.mask, self.q_salient.float(), sign * self.k)

    def weight_hat(self) -> torch.Tensor:
        return self._q() * self.scale

    def integers(self):
        return self._q().detach(), self.scale.clone(), torch.zeros_like(self.scale, dtype=torch.int16)
