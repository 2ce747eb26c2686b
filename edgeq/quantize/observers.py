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
    """Accumulates the range of a layer's input, per channel of its last axis, and a bounded random sample of its
    values with their channels, so the statistics can be carried over to the input divided per channel."""

    def __init__(self, seed: int = 0):
        self.ch_lo: torch.Tensor | None = None
        self.ch_hi: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.sample_channels: list[torch.Tensor] = []
        self.n_sampled = 0
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def lo(self) -> torch.Tensor:
        return self.ch_lo.min() if self.ch_lo is not None else torch.tensor(float("inf"))

    @property
    def hi(self) -> torch.Tensor:
        return self.ch_hi.max() if self.ch_hi is not None else torch.tensor(float("-inf"))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows = x.reshape(-1, x.shape[-1])
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        self.ch_lo = lo if self.ch_lo is None else torch.minimum(self.ch_lo, lo)
        self.ch_hi = hi if self.ch_hi is None else torch.maximum(self.ch_hi, hi)
        if self.n_sampled < SAMPLE_CAP:
            x = x.reshape(-1)
            take = min(SAMPLE_PER_CALL, x.numel())
            idx = torch.randint(0, x.numel(), (take,), generator=self.gen)
            self.samples.append(x[idx])
            self.sample_channels.append(idx % rows.shape[1])
            self.n_sampled += take

    def divide_channels(self, s: torch.Tensor) -> None:
        """The statistics of x / s (s > 0 per channel of the last axis) instead of x: SmoothQuant's smoothed input."""
        self.ch_lo, self.ch_hi = self.ch_lo / s, self.ch_hi / s
        self.samples = [v / s[c] for v, c in zip(self.samples, self.sample_channels)]

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

    def divide_channels(self, s: torch.Tensor) -> None:
        """The Hessian of x / s (s per input column) instead of x: diag(1/s) H diag(1/s)."""
        self.H /= s[:, None] * s[None, :]

    def result(self) -> torch.Tensor:
        return self.H.to(torch.float32)


class StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early (every observer has had its input)."""


class UntilSeen:
    """Calibration passes that end once every observed module has had its input.

    Observing hooks call `seen(key)`. The first pass runs to the end and counts the calls; if it
    saw every key exactly once, each later pass raises StopForward from the call that completes the
    set, before the module that came last computes anything: the rest of the forward (an LM head's
    logits, a block's down projection when only the layers before it observe) feeds no observer.
    A key seen twice or not at all in the first pass (a module reused within a forward, or one
    called only for some inputs) keeps every pass running to the end. With no keys there is no pass.
    """

    def __init__(self, keys=()):
        self.keys = set(keys)
        self.calls: dict = {}
        self.armed = False

    def seen(self, key) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.armed and len(self.calls) == len(self.keys):
            raise StopForward

    def run(self, forward: Callable, items) -> None:
        """`forward(item)` for each item, stopping each pass once everything has been seen."""
        if not self.keys:
            return
        for i, item in enumerate(items):
            self.calls.clear()
            try:
                forward(item)
            except StopForward:
                continue
            if i == 0:
                self.armed = self.calls.keys() == self.keys and all(n == 1 for n in self.calls.values())


@torch.no_grad()
def feed_observing_inputs(model: torch.nn.Module, observers: dict[torch.nn.Module, Callable[[torch.Tensor], None]],
                          batches, **kwargs) -> None:
    """Run `batches` through `model` (with `kwargs`), handing each observed module's first input to its
    callback; each pass ends once every observed module has had its input (`UntilSeen`)."""
    until = UntilSeen(observers)

    def hook(mod, args, fn):
        fn(args[0])
        until.seen(mod)

    handles = [m.register_forward_pre_hook(lambda mod, args, fn=fn: hook(mod, args, fn)) for m, fn in observers.items()]
    try:
        until.run(lambda batch: model(*batch, **kwargs), batches)
    finally:
        for h in handles:
            h.remove()
