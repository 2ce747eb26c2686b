"""Small seeded CNNs for the ONNX export tests: strided conv, depthwise conv, pointwise conv, linear head (Gemm);
the same with BatchNorms and TF-style padding; residual blocks."""

from __future__ import annotations

import torch


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.pw(x))
        return self.head(x.mean(dim=(2, 3)))


def small_cnn():
    """Resolved as `tests.export.onnx_cnn:small_cnn`; 224 px like the bundled calibration images."""
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.zeros(1, 3, 224, 224)


class BatchNormCNN(torch.nn.Module):
    """EfficientNet-Lite's pattern: TF-style zero padding, Conv -> BatchNorm -> ReLU6, a projection read by a float op."""

    def __init__(self):
        super().__init__()
        self.stem_pad = torch.nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(8, eps=1e-3)
        self.dw_pad = torch.nn.ZeroPad2d(1)
        self.dw = torch.nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.dw_bn = torch.nn.BatchNorm2d(8, eps=1e-3)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.pw_bn = torch.nn.BatchNorm2d(8, eps=1e-3)
        self.head = torch.nn.Linear(8, 10)
        for bn in (self.stem_bn, self.dw_bn, self.pw_bn):  # trained-looking statistics, some gains negative
            bn.weight.data = torch.randn(8)
            bn.bias.data = torch.randn(8) * 0.1
            bn.running_mean = torch.randn(8) * 0.1
            bn.running_var = torch.rand(8) + 0.5

    def forward(self, x):
        x = torch.nn.functional.relu6(self.stem_bn(self.stem(self.stem_pad(x))))
        x = torch.nn.functional.relu6(self.dw_bn(self.dw(self.dw_pad(x))))
        return self.head(self.pw_bn(self.pw(x)).mean(dim=(2, 3)))


def batchnorm_cnn():
    """Resolved as `tests.export.onnx_cnn:batchnorm_cnn`."""
    torch.manual_seed(0)
    return BatchNormCNN().eval(), torch.zeros(1, 3, 224, 224)


class SkipAroundNormCNN(torch.nn.Module):
    """A conv whose output its BatchNorm and a skip connection both read: that norm cannot be folded into it."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(8)
        self.pw = torch.nn.Conv2d(8, 8, 1, bias=False)
        self.pw_bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)
        for bn in (self.stem_bn, self.pw_bn):
            bn.weight.data = torch.randn(8) + 2.0
            bn.running_mean = torch.randn(8)
            bn.running_var = torch.rand(8) + 0.5

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = self.pw(x)
        return self.head((self.pw_bn(y) + y).mean(dim=(2, 3)))


def skip_around_norm_cnn():
    """Resolved as `tests.export.onnx_cnn:skip_around_norm_cnn`."""
    torch.manual_seed(0)
    return SkipAroundNormCNN().eval(), torch.zeros(1, 3, 224, 224)


def dead_channel_cnn():
    """Resolved as `tests.export.onnx_cnn:dead_channel_cnn`: BatchNormCNN whose stem norm has a dead channel (gain
    1e-9, shift 2: the channel's output is 2 whatever the input), read by the next conv, as pruned networks have."""
    model, example = batchnorm_cnn()
    model.stem_bn.weight.data[2], model.stem_bn.bias.data[2] = 1e-9, 2.0
    return model, example


class InvertedResidual(torch.nn.Module):
    """MobileNetV2 / EfficientNet-Lite's block: expand -> depthwise -> project, plus a skip."""

    def __init__(self, channels: int, expanded: int):
        super().__init__()
        self.expand = torch.nn.Conv2d(channels, expanded, 1)
        self.dw = torch.nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded)
        self.project = torch.nn.Conv2d(expanded, channels, 1)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.dw(torch.nn.functional.relu6(self.expand(x))))
        return x + self.project(y)


class ResidualCNN(torch.nn.Module):
    """Two inverted residual blocks in a row (the second block's skip is the first block's Add), then a mean over H, W
    that drops them (timm's pooling) and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.blocks = torch.nn.ModuleList(InvertedResidual(8, 16) for _ in range(2))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def residual_cnn():
    """Resolved as `tests.export.onnx_cnn:residual_cnn`."""
    torch.manual_seed(0)
    return ResidualCNN().eval(), torch.zeros(1, 3, 224, 224)
