"""Activation range observers for static quantization: min/max, percentile and MSE-optimal clipping."""

from __future__ import annotations

from typing import Callable

import torch

from .primitives import act_qparams, fake_quant_act

SAMPLE_PER_CALL = 1 << 16
SAMPLE_CAP = 1 << 21


def tail_quantiles(x: torch.Tensor, qs: list[float], max_tail: int = 4096) -> torch.Tensor:
    """torch.quantile(x, qs) (linear interpolation), value for value, from the two order statistics
    each quantile needs: found with topk when they lie within `max_tail` of either end (the 99.999th
    percentile of 2M samples is the 21st largest value), which skips sorting the whole sample."""
    x = x.reshape(-1)
    n = x.numel()
    out = []
    for q in qs:
        pos = torch.tensor(q, dtype=x.dtype) * (n - 1)  # as torch.quantile computes it (in x's dtype)
        lo = int(pos.floor())
        hi = min(lo + 1, n - 1)
        if n - 1 - lo < max_tail:
            top = torch.topk(x, n - lo).values  # descending: rank r from the bottom is top[n - 1 - r]
            a, b = top[n - 1 - lo], top[n - 1 - hi]
        elif hi < max_tail:
            bottom = torch.topk(x, hi + 1, largest=False).values  # ascending
            a, b = bottom[lo], bottom[hi]
        else:
            out.append(torch.quantile(x, torch.tensor([q], dtype=x.dtype))[0])
            continue
        out.append(torch.lerp(a, b, pos - pos.floor()))
    return torch.stack(out)


class ActObserver:
    """Accumulates the range of a layer's input and a bounded random sample of its values."""

    def __init__(self, seed: int = 0):
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []
        self.n_sampled = 0
        self.gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        self.lo = torch.minimum(self.lo, x.min())
        self.hi = torch.maximum(self.hi, x.max())
        if self.n_sampled < SAMPLE_CAP:
            take = min(SAMPLE_PER_CALL, x.numel())
            idx = torch.randint(0, x.numel(), (take,), generator=self.gen)
            self.samples.append(x[idx])
            self.n_sampled += take

    def qparams(self, method: str, bits: int = 8, symmetric: bool = False, percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (scalars) of the activation grid chosen by `method`."""
        if method == "minmax" or not self.samples:
            return act_qparams(self.lo, self.hi, bits, symmetric)
        sample = torch.cat(self.samples)
        if method == "percentile":
            lo, hi = tail_quantiles(sample[: 1 << 24], [1.0 - percentile / 100.0, percentile / 100.0])
            return act_qparams(lo, hi, bits, symmetric)
        best, best_err = None, float("inf")
        for ratio in torch.linspace(0.2, 1.0, 33):
            scale, zp = act_qparams(self.lo * ratio, self.hi * ratio, bits, symmetric)
            err = (fake_quant_act(sample, scale, zp, bits, symmetric, narrow=False) - sample).pow(2).mean().item()
            if err < best_err:
                best, best_err = (scale, zp), err
        return best


class HessianAccumulator:
    """GPTQ's H = 2/n * sum(x x^T) over the rows of a layer's input, accumulated in float32 as the
    GPTQ reference does (float64 matmuls took twice as long on SmolLM2's calibration)."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        rows = x.shape[0]
        self.H *= self.n / (self.n + rows)
        self.n += rows
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x

    def result(self) -> torch.Tensor:
        return self.H.to(torch.float32)


@torch.no_grad()
def feed_observing_inputs(model: torch.nn.Module, observers: dict[torch.nn.Module, Callable[[torch.Tensor], None]],
                          batches) -> None:
    """Run `batches` through `model`, handing each observed module's first input to its callback."""
    handles = [m.register_forward_pre_hook(lambda mod, args, fn=fn: fn(args[0])) for m, fn in observers.items()]
    try:
        for batch in batches:
            model(*batch)
    finally:
        for h in handles:
            h.remove()
