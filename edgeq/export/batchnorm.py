"""BatchNorm folding on edgeq's grid, shared by the TFLite and ONNX renderings (torch side).

An eval-mode BatchNorm2d after a quantized conv is folded into it: the weight becomes `q * fp32(scale * factor)`
with `factor = gamma / sqrt(var + eps)`, and the norm's shift goes into the bias. edgeq's integers are kept,
its scales are scaled. TFLite has no separate BatchNorm. ONNX Runtime fuses a QDQ Conv into QLinearConv
only when a QuantizeLinear reads its output, which the BatchNormalization in between prevented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quantize.modules import QuantConv2d, activations_as, quant_layers
from ..quantize.transforms import batchnorm_affine, batchnorm_pairs
from ..recipe import ActSpec


class DequantConv(torch.nn.Module):
    """A QuantConv2d as a float conv with its dequantized weight (TF-style static padding kept).

    With `fold` (a BatchNorm's per-channel factor and shift) the norm is folded here, on edgeq's
    grid: the weight is `q * fp32(scale * factor)`, so the converter finds nothing left to fold and
    the file holds edgeq's integers with scales scaled by the BatchNorm factor.
    """

    def __init__(self, q: QuantConv2d, fold=None):
        super().__init__()
        self.static_padding = q.static_padding
        self.conv_args = q.conv_args
        self.in_channels, self.out_channels, self.kernel_size = q.in_channels, q.out_channels, q.kernel_size
        self.stride, self.padding, self.dilation, self.groups = q.stride, q.padding, q.dilation, q.groups  # as QuantConv2d
        self.weight = torch.nn.Parameter(render_weight(q, fold), requires_grad=False)
        bias = q.bias.detach() if q.bias is not None else None
        if fold is not None:
            bias = fold.shift if bias is None else bias * fold.factor + fold.shift
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x):
        if self.static_padding is not None:
            x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, **self.conv_args)


def rendered_scale(q, fold=None) -> torch.Tensor:
    """The scales the file holds for a layer: edgeq's, times a folded BatchNorm factor if any; a dead channel's
    (`BnFold.dead`) the least its bias fits the int32 grid with."""
    if fold is None:
        return q.scale.detach().to(torch.float32)
    scale = (q.scale.detach().to(torch.float32) * fold.factor[:, None]).to(torch.float32)
    return scale if fold.dead is None else torch.where(fold.dead[:, None], fold.floor[:, None], scale)


def folded_integers(q, fold=None) -> torch.Tensor:
    """The integers the file holds for a layer: edgeq's, a dead channel's (`BnFold.dead`) its zero point."""
    if fold is None or fold.dead is None:
        return q.qweight.detach()
    ints = q.qweight.detach().clone()
    zero = q.zero_point.detach().to(ints.dtype).expand(ints.shape[0], -1)[:, :1]  # [out, 1]; symmetric weights: 0
    ints[fold.dead] = zero[fold.dead].expand(-1, ints.shape[1])
    return ints


def render_weight(q, fold=None) -> torch.Tensor:
    """The float weight in PyTorch layout: `(q - zp) * scale` with the rendered integers and scale."""
    from ..quantize.primitives import dequantize

    w = dequantize(folded_integers(q, fold), rendered_scale(q, fold), q.zero_point, q.decision.group_size)
    return w.reshape(q.decision.shape).detach().clone()


@dataclass(frozen=True)
class BnFold:
    """An eval-mode BatchNorm2d folded into the conv before it: y = conv(x) * factor + shift.

    `dead`: the output channels whose folded bias a static 8-bit input's int32 bias grid (input scale x folded weight
    scale) cannot hold: a gain near 0 makes the weight scale ~1e-11 and the channel's output its bias, which ONNX
    Runtime's bias quantization casts to INT_MIN and ai-edge-quantizer clips to ~0. Such a channel is rendered with
    zero integers on a scale of at least `floor`, where its bias fits (as ORT's quantize_static rescales such weights);
    that drops what its weights added, at most 127 x their scale x sum |x|.
    """

    norm: str
    factor: torch.Tensor
    shift: torch.Tensor
    dead: torch.Tensor | None = None  # bool [out]
    floor: torch.Tensor | None = None  # float32 [out]

    def dead_channels(self) -> list[int]:
        return [] if self.dead is None else torch.nonzero(self.dead).flatten().tolist()


def bn_folds(model: torch.nn.Module, example: tuple) -> dict[str, BnFold]:
    """conv layer -> (factor, shift) of the eval-mode BatchNorm2d reading its output, found by tracing one call.

    Quantized-model directories fold their BatchNorms before quantizing (`transforms.fold_batchnorms`), so this finds
    none left in them; it folds those of directories quantized with `fold_batchnorms = false` or before 2026-12-05."""
    convs = {n: m for n, m in quant_layers(model).items() if isinstance(m, QuantConv2d)}
    folds = {}
    for conv, norm in batchnorm_pairs(model, convs, example).items():
        factor, shift = batchnorm_affine(model.get_submodule(norm))
        folds[conv] = BnFold(norm, factor, shift, *_off_int32_grid(convs[conv], factor, shift))
    if folds and not _folding_holds(model, example, folds):
        folds = {c: f for c, f in folds.items() if _folding_holds(model, example, {c: f})}
    return folds


INT32_MAX = 2**31 - 1


def _off_int32_grid(q: QuantConv2d, factor: torch.Tensor, shift: torch.Tensor) -> tuple:
    """(dead, floor) of a folded conv (`BnFold`), or (None, None) when every channel's bias fits its int32 grid or the
    conv has no static 8-bit input (16-bit grids take int64 biases; float inputs a float bias)."""
    a = q.decision.activation
    if a.mode != "static" or a.bits != 8 or q.decision.group_size is not None:
        return None, None
    bias = shift if q.bias is None else q.bias.detach().float() * factor + shift
    x_scale = float(q.act_scale)
    step = x_scale * (q.scale.detach().double() * factor.double()[:, None]).abs().amax(dim=1)
    dead = bias.double().abs() >= INT32_MAX * step
    if not dead.any():
        return None, None
    return dead, (bias.double().abs() / (x_scale * 2**30)).float()


def _folding_holds(model: torch.nn.Module, example: tuple, folds: dict[str, BnFold]) -> bool:
    """Whether the model computes the same with these norms folded: each conv's output put through its norm's affine,
    each norm an identity (float activations, so only float rounding differs). Folding rewrites the conv's output,
    so a second reader of it (a skip connection taken before the norm), or a norm called on other tensors too, would
    see other values: such a norm stays a separate op."""
    modules = dict(model.named_modules())

    def run(folded: bool):
        hooks = []
        if folded:
            for conv, f in folds.items():
                scale, shift = f.factor[None, :, None, None], f.shift[None, :, None, None]
                hooks.append(modules[conv].register_forward_hook(lambda mod, a, o, s=scale, b=shift: o * s + b))
                hooks.append(modules[f.norm].register_forward_hook(lambda mod, a, o: a[0]))
        try:
            with torch.no_grad():
                return [t.float() for t in torch.utils._pytree.tree_leaves(model(*example)) if torch.is_tensor(t)]
        finally:
            for h in hooks:
                h.remove()

    with activations_as(quant_layers(model), ActSpec()):
        ref, got = run(False), run(True)
    return all(a.shape == b.shape and float((a - b).abs().max()) <= 1e-3 * max(float(a.abs().max()), 1e-6)
               for a, b in zip(ref, got))
