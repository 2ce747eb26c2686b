"""The PyTorch simulation: layers that hold edgeq's integers and compute with them exactly.

`QuantLinear` / `QuantConv2d` keep the integer weight, scales and zero points as buffers and
dequantize with `(q - zp) * scale`; activations are fake-quantized on the layer's grid (static,
or computed per call as ONNX Runtime's DynamicQuantizeLinear does). This is the reference the
ONNX and TFLite renderings are checked against.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from ..recipe import ActSpec, WeightSpec
from .primitives import dequantize, dynamic_fake_quant_act, fake_quant_act


TIED_METHOD = "tied"  # a LM head computing with its tied embedding's integers (stored once, with the embedding)


@dataclass
class LayerDecision:
    """One layer's quantization decision (the tensors live in the module's buffers)."""

    name: str
    kind: str  # linear | conv2d | embedding
    weight: WeightSpec
    activation: ActSpec
    method: str
    gamma: float
    shape: tuple  # the float weight's shape

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerDecision":
        return cls(d["name"], d["kind"], WeightSpec(**d["weight"]), ActSpec(**d["activation"]), d["method"],
                   float(d["gamma"]), tuple(d["shape"]))

    @property
    def group_size(self) -> int | None:
        return self.weight.group_size if self.weight.granularity == "group" else None


class _QuantBase(torch.nn.Module):
    # x -> x on a runtime's own grid, in place of the decision's activation grid while an export measures parity
    # against what that runtime computes (`tflite_grids.on_runtime_grid`); None: the decision's grid
    runtime_grid = None

    def _init_quant(self, decision: LayerDecision, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    act_scale: torch.Tensor | None, act_zero_point: torch.Tensor | None) -> None:
        self.decision = decision
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("zero_point", zero_point.to(torch.int16).contiguous())
        if decision.activation.mode == "static":
            self.register_buffer("act_scale", act_scale.reshape(()).to(torch.float32))
            self.register_buffer("act_zero_point", act_zero_point.reshape(()).to(torch.int16))
        self._w_cache: torch.Tensor | None = None

    def weight_2d(self) -> torch.Tensor:
        """The dequantized weight as [out, in*kh*kw] (cached; buffers are immutable after creation)."""
        if self._w_cache is None or self._w_cache.device != self.qweight.device:
            self._w_cache = dequantize(self.qweight, self.scale, self.zero_point, self.decision.group_size)
        return self._w_cache

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime_grid is not None:
            return self.runtime_grid(x)
        act = self.decision.activation
        if act.mode == "static":
            return fake_quant_act(x, self.act_scale, self.act_zero_point, act.bits, act.symmetric, narrow=False)
        if act.mode == "dynamic":
            return dynamic_fake_quant_act(x, act.bits, per_token=act.granularity == "token", symmetric=act.symmetric,
                                          group_size=act.group_size if act.granularity == "group" else None)
        return x

    def extra_repr(self) -> str:
        d = self.decision
        return f"{d.weight.name}, act={d.activation.mode}{d.activation.bits if d.activation.quantized else ''}, method={d.method}"


class QuantLinear(_QuantBase):
    def __init__(self, decision: LayerDecision, qweight, scale, zero_point, bias=None, act_scale=None, act_zero_point=None):
        super().__init__()
        self.out_features, self.in_features = decision.shape
        self._init_quant(decision, qweight, scale, zero_point, act_scale, act_zero_point)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_2d()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.weight_2d(), self.bias)


class QuantConv2d(_QuantBase):
    def __init__(self, decision: LayerDecision, conv: torch.nn.Conv2d, qweight, scale, zero_point, act_scale=None, act_zero_point=None):
        super().__init__()
        self.conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        self.padding_mode = conv.padding_mode
        # TF-style "same" convolutions (EfficientNet ports) pad in a submodule before the conv
        self.static_padding = getattr(conv, "static_padding", None)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        # nn.Conv2d's attributes, which model code reads (Hugging Face MobileNet's TF-style padding: stride, dilation)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._init_quant(decision, qweight, scale, zero_point, act_scale, act_zero_point)
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_2d().reshape(self.decision.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.padding_mode == "zeros", "only zero padding is quantized"
        if self.static_padding is not None:
            x = self.static_padding(x)
        return F.conv2d(self.quant_input(x), self.weight, self.bias, **self.conv_args)


class QuantEmbedding(_QuantBase):
    """An input embedding whose table is held as integers (one row per token, its own scale per row or group)."""

    def __init__(self, decision: LayerDecision, qweight, scale, zero_point, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = decision.shape
        self.padding_idx = padding_idx
        self._init_quant(decision, qweight, scale, zero_point, None, None)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_2d()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_2d(), self.padding_idx)


def quant_layers(model: torch.nn.Module) -> dict[str, _QuantBase]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantBase)}


@contextlib.contextmanager
def activations_as(layers: dict, spec: ActSpec, kind: str | None = None):
    """The simulation with every layer's (or every `kind` layer's) activation grid set to `spec` for a while:
    float (ActSpec()) is the reference for an fp32 rendering of a QDIR, LiteRT's run-time grid what hybrid kernels run."""
    saved = {n: m.decision for n, m in layers.items()}
    try:
        for m in layers.values():
            if kind is None or m.decision.kind == kind:
                m.decision = replace(m.decision, activation=spec)
        yield
    finally:
        for n, m in layers.items():
            m.decision = saved[n]


def set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
