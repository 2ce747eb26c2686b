"""Per-layer sensitivity for mixed precision: an empirical-Fisher loss model from backward passes.

For a Linear y = x W^T the per-token gradient of W is g_t x_t^T, so the diagonal of the per-token
Fisher is F = N * sum_t g_t^2 (x) x_t^2 (g_t: gradient of the mean loss at the layer's output row
t, N tokens), one extra matmul per layer and batch, computed in hooks. Quantizing the layer alone
to weight W_q is then predicted to raise the loss by 0.5 * sum F (W_q - W)^2 (second-order Taylor
with the Fisher as the Hessian, as HAWQ / OBS-style methods do). Its mean over the weights is the
layer's sensitivity s (a Fisher trace per weight); with the weight variance it forms Hasan's
importance s * var used by the closed-form allocation.

The loss is the model's own objective: next-token cross-entropy for causal LMs; otherwise the mean
squared error to the float model's output, whose Gauss-Newton diagonal is estimated with one
Rademacher probe per batch (E[(v^T J)^2] = diag J^T J). The same hooks record each layer's input
kurtosis (activation outliers).

Nothing here changes the model's weights; `measure_layers` swaps a weight temporarily.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .primitives import compute_qparams, dequantize, quantize


@dataclass
class LayerSensitivity:
    name: str
    shape: tuple
    fisher: torch.Tensor = field(repr=False)  # diagonal, same shape as the 2-D weight
    variance: float = 0.0
    kurtosis: float = 0.0  # of the layer's input (non-excess: a Gaussian is 3)

    @property
    def params(self) -> int:
        return self.fisher.numel()

    @property
    def sensitivity(self) -> float:
        """Mean Fisher diagonal (Fisher trace per weight)."""
        return float(self.fisher.mean())


def model_output(out) -> torch.Tensor:
    """The tensor a model call produced (logits of HF outputs, first element of tuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return model_output(out[0])
    if isinstance(out, dict):
        return model_output(next(iter(out.values())))
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


class Objective:
    """The loss whose increase mixed precision predicts and measures."""

    def __init__(self, is_lm: bool):
        self.is_lm = is_lm
        self.reference: dict[int, torch.Tensor] = {}  # batch index -> float output (non-LM)

    @property
    def name(self) -> str:
        return "next-token cross-entropy (nats)" if self.is_lm else "mean squared error to the float output"

    def loss(self, model, batch, index: int) -> torch.Tensor:
        if self.is_lm:
            ids = batch[0]
            return model(*batch, labels=ids).loss if _accepts_labels(model) else _lm_loss(model_output(model(*batch)), ids)
        out = model_output(model(*batch)).float()
        if index not in self.reference:
            self.reference[index] = out.detach()
        return (out - self.reference[index]).pow(2).mean()

    def fisher_pass(self, model, batch, index: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
        """(scalar to backpropagate, factor turning sum_t g^2 x^2 into the Fisher of the loss)."""
        if self.is_lm:
            loss = self.loss(model, batch, index)
            ids = batch[0]
            n = ids.numel() - ids.shape[0]  # predicted tokens
            return loss, float(n)
        out = model_output(model(*batch)).float()
        self.reference.setdefault(index, out.detach())
        v = torch.randint(0, 2, out.shape, generator=gen).float() * 2 - 1
        # loss = mean (o - o_ref)^2 has Hessian 2/M J^T J; the probe estimates J^T J
        return (out * v).sum(), 2.0 / out.numel()


def _accepts_labels(model) -> bool:
    import inspect

    try:
        return "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class _Moments:
    def __init__(self):
        self.s = torch.zeros(5, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        self.s += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), x.pow(2).sum(), x.pow(3).sum(), x.pow(4).sum()])

    def kurtosis(self) -> float:
        n, s1, s2, s3, s4 = (float(v) for v in self.s)
        if n == 0:
            return 0.0
        mu = s1 / n
        m2 = s2 / n - mu * mu
        m4 = s4 / n - 4 * mu * s3 / n + 6 * mu * mu * s2 / n - 3 * mu**4
        return m4 / (m2 * m2) if m2 > 0 else 0.0


@contextlib.contextmanager
def _fisher_hooks(model, names):
    acc = {n: None for n in names}
    moments = {n: _Moments() for n in names}
    scale = [1.0]
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def fwd(mod, args, output, name=name):
            x = args[0].detach()
            moments[name].add(x)
            if isinstance(mod, torch.nn.modules.conv._ConvNd):
                return  # its Fisher is its weight's gradient squared (fisher_sensitivity)
            x2 = x.reshape(-1, x.shape[-1]).float().pow(2)

            def grad_hook(grad, x2=x2):
                g = grad.detach().reshape(-1, grad.shape[-1]).float()
                f = (g * g).T @ x2 * scale[0]
                acc[name] = f if acc[name] is None else acc[name] + f

            if output.requires_grad:
                output.register_hook(grad_hook)

        handles.append(module.register_forward_hook(fwd))
    try:
        yield acc, moments, scale
    finally:
        for h in handles:
            h.remove()


def fisher_sensitivity(model: torch.nn.Module, names: list[str], batches: list, objective: Objective,
                       progress=None, seed: int = 0) -> dict[str, LayerSensitivity]:
    """Fisher diagonals, weight variances and input kurtosis of the Linear and Conv2d layers `names`."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    weights = [model.get_submodule(n).weight for n in names]
    # A convolution's weight is shared by every position of its output, so its per-position gradients are not at
    # hand as a Linear's per-token ones are: its Fisher is the squared gradient of each batch. For the Rademacher
    # probe of a non-LM objective that is an unbiased estimate of diag J^T J; for an LM it is the batch's Fisher.
    convs = {n for n in names if isinstance(model.get_submodule(n), torch.nn.modules.conv._ConvNd)}
    for w in weights:
        w.requires_grad_(True)
    try:
        with _fisher_hooks(model, names) as (acc, moments, scale):
            items = list(enumerate(batches))
            for i, batch in (progress(items, "sensitivity") if progress else items):
                out, factor = objective.fisher_pass(model, batch, i, gen)
                scale[0] = factor / len(batches)
                out.backward()
                for name, w in zip(names, weights):
                    if name in convs and w.grad is not None:
                        f = w.grad.detach().float().reshape(w.shape[0], -1).pow(2) * scale[0]
                        acc[name] = f if acc[name] is None else acc[name] + f
                    w.grad = None
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)
    result = {}
    for name, w in zip(names, weights):
        f = acc[name]
        assert f is not None, f"layer {name} was not reached by the calibration batches"
        w2 = w.detach().float().reshape(w.shape[0], -1)
        result[name] = LayerSensitivity(name, tuple(w.shape), f.reshape(w2.shape), float(w2.var()), moments[name].kurtosis())
    return result


def weight_error(weight: torch.Tensor, spec, gamma: float = 1.0) -> torch.Tensor:
    """W_q - W for round-to-nearest on `spec`'s grid."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    gs = spec.group_size if spec.granularity == "group" else None
    scale, zp = compute_qparams(w, spec.bits, spec.symmetric, spec.granularity, spec.group_size, gamma, spec.scale_dtype,
                                 full_range=spec.range == "full")
    if spec.granularity == "tensor":
        scale, zp = scale.expand(w.shape[0], 1), zp.expand(w.shape[0], 1)
    return dequantize(quantize(w, scale, zp, spec.bits, spec.symmetric, gs), scale, zp, gs) - w


def predicted_loss(sens: LayerSensitivity, weight: torch.Tensor, spec) -> float:
    """0.5 * sum F (W_q - W)^2: the loss increase predicted when this layer alone is quantized."""
    d = weight_error(weight, spec)
    return float(0.5 * (sens.fisher * d * d).sum())


@torch.no_grad()
def mean_loss(model, batches: list, objective: Objective) -> float:
    return float(sum(objective.loss(model, b, i) for i, b in enumerate(batches)) / len(batches))


@torch.no_grad()
def measure_layers(model, plan: dict[str, object], batches: list, objective: Objective, base: float,
                   progress=None) -> dict[str, float]:
    """Measured loss increase when each layer alone is round-to-nearest quantized to its planned spec."""
    out = {}
    items = list(plan.items())
    for name, spec in (progress(items, "measure") if progress else items):
        w = model.get_submodule(name).weight
        saved = w.detach().clone()
        w.add_(weight_error(saved, spec).reshape(w.shape))
        try:
            out[name] = mean_loss(model, batches, objective) - base
        finally:
            w.copy_(saved)
    return out
