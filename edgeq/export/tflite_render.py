"""The PyTorch side of a TFLite export: the float module litert-torch converts, rendering edgeq's quantization.

A quantized model is rendered as plain float layers holding its dequantized weights `(q - zp) * scale`
(never its fake-quant simulation): BatchNorms after quantized convs are folded on edgeq's grid, and norm
gains are written so the converter cannot fold them into the next layer's weight. `tflite_graph` converts
this rendering and finds each layer in the flatbuffer by the exact bytes of `tflite_weight`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..errors import EdgeqError
from ..quantize.modules import QuantEmbedding, QuantLinear, quant_layers, set_module
from ..quantize.transforms import gain_offset, head_name
from .batchnorm import DequantConv, render_weight
from .tflite_grids import grouped_conv_refusal


class _UnfoldableRMSNorm(torch.nn.Module):
    """An RMSNorm whose gain the converter cannot fold into the next layer's weight.

    LiteRT's converter fuses a constant MUL feeding FULLY_CONNECTED into its weight, which would
    change edgeq's integers when norm gains are kept unfolded (the INT4 presets keep them). Here the
    gain multiplies the per-token rsqrt first, so the MUL feeding the layer has no constant operand.
    """

    def __init__(self, norm, offset: float):
        super().__init__()
        self.weight, self.offset = norm.weight, offset  # the gain is weight + offset (`transforms.gain_offset`)
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        self.factor = None  # a constant the output is multiplied by, in the gain (`_final_cap`)

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        gain = self.weight + self.offset if self.offset else self.weight
        if self.factor is not None:
            gain = gain * self.factor
        return (x.to(torch.float32) * (torch.rsqrt(variance + self.eps) * gain)).to(x.dtype)


class _CappedHead(torch.nn.Module):
    """Gemma 2's final logit soft-capping, cap * tanh(logits / cap), with the division moved before the head into the
    final norm's gain (`_final_cap`): as `logits / cap` after the head's FULLY_CONNECTED, the converter folds it into
    the head's weight."""

    def __init__(self, head: torch.nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, x):
        return torch.tanh(self.head(x)) * self.cap


def _final_cap(model: torch.nn.Module, gained: dict) -> tuple[float, str, str] | None:
    """(cap, final norm, head) of a model whose logits are soft-capped after the head (Gemma 2's
    `final_logit_softcapping`) and whose final norm is rendered by `_UnfoldableRMSNorm`; else None."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    head = head_name(model)
    norm = "model.norm" if isinstance(gained.get("model.norm"), _UnfoldableRMSNorm) else None
    return (float(cap), norm, head) if cap and head and norm else None


class _UnfoldableLayerNorm(torch.nn.Module):
    """A LayerNorm over the last axis whose gain the converter cannot fold into the next layer's weight (BERT-style
    encoders: every query/key/value and first FFN linear reads one), the same way as `_UnfoldableRMSNorm`; the
    shift stays a constant ADD, which the converter may move into the next layer's bias, never its weight."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        # Hugging Face ConvNeXt's LayerNorm subclass normalizes the channels of an NCHW map (permuted last and back)
        self.channels_first = getattr(norm, "data_format", "channels_last") == "channels_first"

    def forward(self, x):
        if self.channels_first:
            return self._normalized(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._normalized(x)

    def _normalized(self, x):
        centered = x - x.mean(-1, keepdim=True)
        y = centered * (torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight)
        return y if self.bias is None else y + self.bias


def _gained_norms(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The norms with a gain a converter could fold into the next layer: name -> their unfoldable rendering."""
    out = {}
    for n, m in model.named_modules():
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        if type(m).__name__.endswith("RMSNorm"):
            offset = gain_offset(m)
            if offset is not None:  # a form it does not know stays as it is: a fold it causes is then refused
                out[n] = _UnfoldableRMSNorm(m, offset)
        elif isinstance(m, torch.nn.LayerNorm) and len(m.normalized_shape) == 1:
            out[n] = _UnfoldableLayerNorm(m)
    return out


def _dequant_module(q, fold=None) -> torch.nn.Module:
    """The float layer rendering a quantized one: its dequantized weight in a plain module."""
    if isinstance(q, QuantEmbedding):
        return torch.nn.Embedding(q.num_embeddings, q.embedding_dim, q.padding_idx, _weight=render_weight(q), _freeze=True)
    if isinstance(q, QuantLinear):
        return _dequant_linear(q)
    return DequantConv(q, fold)


def _dequant_linear(q: QuantLinear) -> torch.nn.Linear:
    lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    lin.weight = torch.nn.Parameter(render_weight(q), requires_grad=False)
    if q.bias is not None:
        lin.bias = q.bias
    return lin


class _WholeMapPool(torch.nn.Module):
    """An AvgPool2d whose window covers its whole input (Hugging Face EfficientNet's global pooling: a kernel of
    `hidden_dim` with ceil_mode, over a 7x7 map) as the mean over the map, which it computes (ceil mode divides by
    the cells inside the input). As an AVERAGE_POOL_2D over a padded map the converter folds the count correction
    (25600 = 320^2 / 4 on the checked model's 2x2 map) into the next FULLY_CONNECTED's weight, which then no longer
    holds edgeq's integers. Any other window pools as before."""

    def __init__(self, pool: torch.nn.AvgPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        k, s, p = (torch.nn.modules.utils._pair(v) for v in (self.pool.kernel_size, self.pool.stride, self.pool.padding))
        covers = all(k[i] >= x.shape[-2 + i] and s[i] >= x.shape[-2 + i] and p[i] == 0 for i in range(2))
        if covers and self.pool.divisor_override is None and (self.pool.ceil_mode or k == tuple(x.shape[-2:])):
            return x.mean(dim=(-2, -1), keepdim=True)
        return self.pool(x)


@contextlib.contextmanager
def float_rendering(model: torch.nn.Module, folds: dict | None = None):
    """Temporarily swap every quantized layer for a float layer with its dequantized weight
    (each BatchNorm in `folds` for an identity, its factor folded into the conv before it, each
    RMSNorm / LayerNorm for a rendering whose gain the converter cannot fold into the next weight, and a
    soft-capped head for `_CappedHead`)."""
    folds = folds or {}
    layers = quant_layers(model)
    norms = {f.norm: model.get_submodule(f.norm) for f in folds.values()}
    gained = _gained_norms(model) if layers else {}
    capped = _final_cap(model, gained)
    pools = [n for n, m in model.named_modules() if type(m) is torch.nn.AvgPool2d] if layers else []
    originals = {n: model.get_submodule(n) for n in [*norms, *gained, *pools, *([capped[2]] if capped else [])]}
    try:
        for name, q in layers.items():
            set_module(model, name, _dequant_module(q, folds.get(name)))
        for n in norms:
            set_module(model, n, torch.nn.Identity())
        for n in pools:
            set_module(model, n, _WholeMapPool(originals[n]))
        for n, m in gained.items():
            set_module(model, n, m)
        if capped:
            cap, norm, head = capped
            gained[norm].factor = 1.0 / cap
            set_module(model, head, _CappedHead(model.get_submodule(head), cap))
            model.config.final_logit_softcapping = None
        yield model
    finally:
        if capped:
            model.config.final_logit_softcapping = capped[0]
        for name, q in layers.items():
            set_module(model, name, q)
        for n, m in originals.items():
            set_module(model, n, m)


class _LogitsLM(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


class _Encoder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _FirstOutput(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *args):
        out = self.m(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "logits", out)


def unused_layers(bundle, model: torch.nn.Module, seq_len: int) -> set[str]:
    """The quantized layers the exported module's outputs do not depend on (no gradient reaches them from one
    forward of the example inputs): what the converter prunes. Each layer's output gets a zero added that the
    gradient is taken for, so layers feeding other layers stay on the path to the outputs. Also those whose input
    does not depend on the module's inputs (`constant_input_layers`), which the converter computes into a constant."""
    return _unreached_layers(bundle, model, seq_len) | constant_input_layers(bundle, model, seq_len)


def constant_input_layers(bundle, model: torch.nn.Module, seq_len: int) -> set[str]:
    """The quantized layers whose float input is the same whatever the module's inputs (DeBERTa-v2's projections of
    its relative-position table): no gradient path from the inputs (float inputs, and every embedding's output for
    token ids) reaches their input, with the parameters' own gradients off for the forward."""
    layers = quant_layers(model)
    constant: set[str] = set()

    def seed(_module, _args, out):
        return out + torch.zeros_like(out, requires_grad=True)

    def check(name):
        def hook(_module, args, _out):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
                constant.add(name)
        return hook

    trainable = [p for p in model.parameters() if p.requires_grad]
    embeddings = [m for m in model.modules() if isinstance(m, (torch.nn.Embedding, QuantEmbedding))]
    hooks = [m.register_forward_hook(seed) for m in embeddings] + [m.register_forward_hook(check(n)) for n, m in layers.items()]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            inputs = [x.clone().requires_grad_(True) if x.is_floating_point() else x for x in example_inputs(bundle, seq_len)]
            graph_module(bundle, model)(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    return constant


def _unreached_layers(bundle, model: torch.nn.Module, seq_len: int) -> set[str]:
    layers = quant_layers(model)
    taps: dict[str, torch.Tensor] = {}

    def tap(name):
        def hook(_module, _args, out):
            taps[name] = torch.zeros_like(out, requires_grad=True)
            return out + taps[name]
        return hook

    hooks = [m.register_forward_hook(tap(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            out = graph_module(bundle, model)(*example_inputs(bundle, seq_len))
            reached = torch.autograd.grad(out.float().sum(), list(taps.values()), allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, g in zip(taps, reached) if g is None} | (set(layers) - set(taps))


def graph_module(bundle, model: torch.nn.Module) -> torch.nn.Module:
    """The module a file is exported from: positional inputs, the main output (logits) first."""
    if bundle.kind == "causal-lm":
        return _LogitsLM(model).eval()
    if bundle.kind == "encoder":
        return _Encoder(model).eval()
    return _FirstOutput(model).eval()


def example_inputs(bundle, seq_len: int) -> tuple:
    """Fixed-shape example inputs: TFLite graphs here are static (token models use `seq_len`)."""
    if bundle.kind == "causal-lm":
        return (torch.zeros(1, seq_len, dtype=torch.long),)
    if bundle.kind == "encoder":
        return (torch.zeros(1, seq_len, dtype=torch.long), torch.ones(1, seq_len, dtype=torch.long))
    if not bundle.example_inputs:
        raise EdgeqError(f"tflite: model {bundle.reference!r} has no example inputs to fix the graph's shapes")
    return tuple(t[:1] for t in bundle.example_inputs)


def tflite_weight(module, fold=None) -> np.ndarray:
    """A quantized layer's dequantized weight in TFLite's layout (FC [out, in]; embedding table [rows, dim];
    conv OHWI; depthwise 1HWO)."""
    w = render_weight(module, fold).to(torch.float32).numpy()
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return np.ascontiguousarray(w)
    if module.conv_args["groups"] == 1:
        return np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    if module.conv_args["groups"] == module.in_channels == module.out_channels:
        return np.ascontiguousarray(w.transpose(1, 2, 3, 0))
    raise EdgeqError(grouped_conv_refusal(module.decision.name))
