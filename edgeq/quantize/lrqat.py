"""LR-QAT (Bondarenko et al. 2024): low-rank quantization-aware training.

    W_hat = s * (clip(round(Phi0 + (alpha / r) * A @ B) + z, qmin, qmax) - z)

Phi0 = phi(W0 / s0) is the frozen pretrained weight in integer units, stored in the base dtype
(`fp32`, `bf16`, `q4.4`: int8 fixed point with 4 fractional bits, or `int`: the RTN integers
themselves, i.e. the packed int-b base). A [out, r] starts at zero (so training starts exactly at
the RTN model), B [r, in] is Kaiming-uniform; A, B and the scales s are the only trainable
tensors. The float weight W0 is not kept. With `checkpoint` the layer's forward is recomputed in
the backward pass, so the [out, in] W_hat and its rounding intermediates are never held for the
backward: memory stays at Phi0 + the low-rank factors.

After training, `integers()` merges the adapters into plain INT-b weights + scales.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import EdgeqError, choice_error
from .primitives import expand_groups, round_ste
from .qat import QATLayer, initial_grid, register_qat, scale_ste, trained_qrange

BASE_DTYPES = ("fp32", "bf16", "q4.4", "int")
Q44_FRAC = 16  # Q4.4: int8 holding round(x * 16), i.e. [-8, 7.9375] in steps of 1/16


def q44_encode(x: torch.Tensor) -> torch.Tensor:
    """Float -> Q4.4 fixed point (int8 = round(16 x), saturated to [-128, 127])."""
    return torch.clamp(torch.round(x * Q44_FRAC), -128, 127).to(torch.int8)


def q44_decode(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) / Q44_FRAC


def encode_base(phi: torch.Tensor, base_dtype: str, bits: int, symmetric: bool) -> torch.Tensor:
    """Store Phi0 = W0 / s0 in `base_dtype`; raises EdgeqError when the dtype cannot hold the grid."""
    if base_dtype == "fp32":
        return phi.float().clone()
    if base_dtype == "bf16":
        return phi.to(torch.bfloat16)
    if base_dtype == "q4.4":
        if not symmetric or bits > 4:
            raise EdgeqError(f"lr-qat: base dtype q4.4 holds [-8, 7.94], which fits symmetric weights of <= 4 bits only (got {bits}-bit "
                             f"{'symmetric' if symmetric else 'asymmetric'}); use fp32, bf16 or int")
        return q44_encode(phi)
    if base_dtype == "int":
        return torch.clamp(torch.round(phi), -128, 127).to(torch.int8)
    raise choice_error("base_dtype", base_dtype, BASE_DTYPES)


def decode_base(stored: torch.Tensor, base_dtype: str) -> torch.Tensor:
    if base_dtype == "q4.4":
        return q44_decode(stored)
    return stored.to(torch.float32)


@register_qat("lr-qat")
class LRQATLinear(QATLayer):
    method = "lr-qat"

    def __init__(self, name, linear, rule, act_qparams=None, options=None):
        super().__init__(name, linear, rule, act_qparams)
        options = options or {}
        spec = rule.weight
        if not spec.quantized or spec.bits < 2:
            raise EdgeqError(f"lr-qat: layer {name} has {spec.bits}-bit weights; LR-QAT needs a 2-8 bit integer grid")
        self.rank = int(options.get("rank", 16))
        if not 1 <= self.rank <= min(linear.weight.shape):
            raise EdgeqError(f"lr-qat: rank {self.rank} is not in [1, {min(linear.weight.shape)}] for layer {name}")
        self.alpha = float(options.get("alpha", self.rank))
        self.base_dtype = options.get("base_dtype", "fp32")
        self.use_checkpoint = bool(options.get("checkpoint", True))
        w0 = linear.weight.detach().float()
        scale, zp = initial_grid(w0, rule)
        s0 = expand_groups(scale, self.in_features, self.group_size)
        self.register_buffer("phi0", encode_base(w0 / s0, self.base_dtype, spec.bits, spec.symmetric))
        self.register_buffer("zero_point", zp)
        self.scale = torch.nn.Parameter(scale.clone())
        self.A = torch.nn.Parameter(torch.zeros(self.out_features, self.rank))
        b = torch.empty(self.rank, self.in_features)
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.B = torch.nn.Parameter(b)

    def _grid(self):
        s = expand_groups(scale_ste(self.scale, self.rule.weight.scale_dtype), self.in_features, self.group_size)
        z = expand_groups(self.zero_point.float(), self.in_features, self.group_size)
        return s, z

    def _q(self, z: torch.Tensor) -> torch.Tensor:
        qmin, qmax = trained_qrange(self.rule.weight)
        latent = decode_base(self.phi0, self.base_dtype) + (self.alpha / self.rank) * (self.A @ self.B)
        return torch.clamp(round_ste(latent) + z, qmin, qmax)

    def weight_hat(self) -> torch.Tensor:
        s, z = self._grid()
        return (self._q(z) - z) * s

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_output(F.linear(self.quant_input(x), self.weight_hat(), self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and self.training:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def integers(self):
        s, z = self._grid()
        scale = scale_ste(self.scale, self.rule.weight.scale_dtype).detach()
        return self._q(z).detach(), scale, self.zero_point.clone()
