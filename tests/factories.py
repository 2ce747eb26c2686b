"""Small models for `package.module:factory` references in tests (seeded, no downloads)."""

from __future__ import annotations

import torch


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval(), (torch.zeros(1, 3, 16, 16),)


class BatchNormCNN(torch.nn.Module):
    """Conv-BatchNorm-ReLU blocks as MobileNets have them: a stem, a depthwise conv and a pointwise one, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(16)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = torch.nn.BatchNorm2d(16)
        self.pw = torch.nn.Conv2d(16, 32, 1, bias=False)
        self.pw_bn = torch.nn.BatchNorm2d(32)
        self.head = torch.nn.Conv2d(32, 64, 1, bias=False)
        self.head_bn = torch.nn.BatchNorm2d(64)
        self.fc = torch.nn.Linear(64, 10)
        for bn in (self.stem_bn, self.dw_bn, self.pw_bn, self.head_bn):  # trained-looking statistics, not 0 / 1
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = torch.relu(self.pw_bn(self.pw(x)))
        x = torch.relu(self.head_bn(self.head(x)))
        return self.fc(x.mean((2, 3)))


def batchnorm_cnn():
    torch.manual_seed(0)
    return BatchNormCNN().eval(), (torch.zeros(1, 3, 16, 16),)


class OddWidthCNN(torch.nn.Module):
    """A head of linear layers 8, 96 and 100 wide: LiteRT's INT4 blocks (32 to 256) divide only the 96."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8, 96)
        self.fc2 = torch.nn.Linear(96, 100)
        self.fc3 = torch.nn.Linear(100, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x)).mean((2, 3))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def odd_width_cnn():
    torch.manual_seed(0)
    return OddWidthCNN().eval(), (torch.zeros(1, 3, 16, 16),)


class UniformLM(torch.nn.Module):
    """Predicts the uniform distribution over `vocab` tokens: its perplexity is exactly `vocab`."""

    def __init__(self, vocab: int = 256):
        super().__init__()
        self.vocab = vocab
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


def broken_factory():
    raise RuntimeError("weights missing")


def not_a_module():
    return 42
