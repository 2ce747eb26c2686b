"""A small seeded CNN for the TFLite export tests: conv, depthwise conv, pointwise conv and a linear head."""

from __future__ import annotations

import torch


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 32, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.pw(x))
        return self.head(x.mean(dim=(2, 3)))


def small_cnn():
    """The factory edgeq resolves as `tests.export.tflite_cnn:small_cnn` (224 px like the bundled images)."""
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.zeros(1, 3, 224, 224)
