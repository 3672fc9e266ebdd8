"""Which means get an input quantizer: a pool (a CNN's global average) does, so that the conv before it
ends in a Q and fuses; a norm's statistic (RMSNorm's mean of squares over the features) does not, since
it fuses nothing and an 8-bit grid over squares loses the small ones."""
from __future__ import annotations

import torch
import torch.nn as nn

import qzo_fx

W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


class RMSNormBlock(nn.Module):
    """LLaMA's RMSNorm, as Hugging Face writes it, before a projection."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.proj(x * torch.rsqrt(variance + 1e-6) * self.weight)


class PooledCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _activation_targets(qm) -> list[str]:
    return [q.target for q in qzo_fx.list_quantizers(qm) if q.role == "activation"]


def test_a_norm_statistic_is_not_quantized_and_a_pool_is():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32) * torch.logspace(-2, 1, 32)  # features of very different sizes
    model = RMSNormBlock()
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    assert len(_activation_targets(qm)) == 1  # the projection's input only
    # The statistic in float: W8A8 tracks the float model as closely as its projection's rounding allows.
    with torch.no_grad():
        error = (qm.eval()(x) - model.eval()(x)).norm() / model(x).norm()
    assert error < 0.02
    cnn = qzo_fx.prepare(PooledCNN(), W8A8, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert len(_activation_targets(cnn)) == 3  # conv input, the pool's input, head input


def test_a_norm_statistic_captured_by_torch_export_is_not_quantized():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    qm = qzo_fx.prepare(RMSNormBlock(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8),
                        example_inputs=(x,), capture="export")
    assert len(_activation_targets(qm)) == 1
