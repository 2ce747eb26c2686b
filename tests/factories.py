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
