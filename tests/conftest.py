"""Shared fixtures: small models and deterministic seeds."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.zoo.models import torchvision_shim

# torchvision from PyPI beside the CPU build of torch cannot register its compiled ops, and
# transformers and timm import it when it is installed: the shim lets every test import them.
torchvision_shim()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture
def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture
def cnn():
    return SmallCNN()
