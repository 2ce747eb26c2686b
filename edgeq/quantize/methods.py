"""Weight quantization methods, by name. New algorithms join through `register_method`.

A method takes the float weight [out, in], the layer's rule and its calibration statistics and
returns the integers, scales and zero points (see `primitives` for the grid conventions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .primitives import compute_qparams, quantize


@dataclass
class LayerStats:
    """What calibration observed at a layer's input: a GPTQ Hessian and/or an activation observer."""

    hessian: torch.Tensor | None = None
    observer: object | None = None
    hessian_kind: str | None = None  # a value projection's: "attention" (mixed by attention weights) or "input"


class Method(Protocol):
    def __call__(self, weight: torch.Tensor, rule, stats: LayerStats, recipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


# name -> (function, needs a Hessian)
METHODS: dict[str, tuple[Method, bool]] = {}


# name -> function(quantized layer, recipe) -> dict stored under the method's name in the layer's quant.json entry
METHOD_RECORDS: dict[str, Callable] = {}


def register_method(name: str, needs_hessian: bool = False) -> Callable[[Method], Method]:
    def register(fn: Method) -> Method:
        METHODS[name] = (fn, needs_hessian)
        return fn

    return register


def weight_group_size(spec) -> int | None:
    return spec.group_size if spec.granularity == "group" else None


@register_method("rtn")
def rtn(weight: torch.Tensor, rule, stats: LayerStats, recipe):
    """Round to nearest on the grid of the layer's own range (times gamma)."""
    spec = rule.weight
    scale, zp = compute_qparams(weight, spec.bits, spec.symmetric, spec.granularity, spec.group_size, rule.gamma, spec.scale_dtype,
                                 full_range=spec.range == "full")
    gs = weight_group_size(spec)
    if spec.granularity == "tensor":
        scale, zp = scale.expand(weight.shape[0], 1).contiguous(), zp.expand(weight.shape[0], 1).contiguous()
    return quantize(weight.float(), scale, zp, spec.bits, spec.symmetric, gs), scale, zp


def _register_gptq() -> None:
    from . import gptq  # noqa: F401  (registers "gptq")
    from . import pbllm  # noqa: F401  (registers "pb-llm", "pb-llm-rtn")
    from . import gamma_search  # noqa: F401  (registers "rtn-gamma")


_register_gptq()
