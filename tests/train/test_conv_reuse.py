"""Sequential branches reuse the base pass's first convolution and its channel-wise chain: the
same losses and estimate as dense branches, changed channels computed again, and the whole
chain wherever the reuse would not be exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.train import base_reuse
from qzo_fx.train.base_reuse import BaseTaps, TAPS
from qzo_fx.train.compiled import kernel
from tests.train.test_base_reuse import train_and_record
from qzo_fx.train.conv_reuse import INCREMENTAL_CONV, ConvChain, IncrementalConv, function_step, module_step, norm_step


class Net(nn.Module):
    def __init__(self, write_after: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.head = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.Linear(8, 4)
        self.write_after = write_after

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        if self.write_after:
            h.add_(0.5)  # an in-place write after the chain: the kept output is no longer the base's
        return self.head(self.conv2(F.relu(h)).mean((2, 3)))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _run(strategy, write_after=False, beta_min=0.99, steps=3):
    torch.manual_seed(0)
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))
    qm = qzo_fx.prepare(Net(write_after), qzo_fx.QuantConfig(weight_bits=3), example_inputs=(batch[0],))
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=beta_min, schedule="constant", seed=5), strategy=strategy)
    return train_and_record(qm, step, batch, "conv1.weight", 0.02, steps)


@pytest.mark.parametrize("beta_min", [0.9999, 0.9, 0.0])
def test_incremental_convolution_branches_equal_dense_branches(beta_min):
    step, losses, grads = _run("sequential", beta_min=beta_min)
    _, dense_losses, dense_grads = _run("inplace", beta_min=beta_min)
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, dense_grads, rtol=1e-4, atol=1e-5)
    layer = step.runner.sequential_graph.get_submodule(INCREMENTAL_CONV)
    assert layer.calls == 2 * 3
    if beta_min > 0.999:  # small steps: no channel or a few change, and the base output serves
        assert layer.incremental_calls > 0


def test_a_write_into_the_kept_output_voids_the_reuse():
    step, losses, _ = _run("sequential", write_after=True)
    _, dense_losses, _ = _run("inplace", write_after=True)
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    assert step.runner.sequential_graph.get_submodule(INCREMENTAL_CONV).incremental_calls == 0


def test_graphs_show_the_tapped_chain_and_the_incremental_convolution():
    step, _, _ = _run("sequential", steps=1)
    code = step.runner.sequential_graph.code
    assert f"self.{INCREMENTAL_CONV}('conv2d'" in code.replace('"', "'")
    assert "bn1" not in code and "relu" not in code  # the chain is inside the incremental layer
    assert f"{TAPS}('conv2d'" in step.base_graph.code.replace('"', "'")


@pytest.mark.parametrize("training", [True, False], ids=["batch-statistics", "running-statistics"])
def test_changed_channels_computed_again_equal_the_whole_chain(training):
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(6).train(training)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.uniform_(0.5, 2)
    chain = ConvChain(1, 1, 1, (norm_step(norm), module_step(nn.ReLU()), function_step(F.leaky_relu, (0.1,), {})))
    x, base_weight, bias = torch.randn(4, 2, 7, 7), torch.randn(6, 2, 3, 3).round(), torch.randn(6)
    taps = BaseTaps()
    taps("c", x, base_weight, chain(x, base_weight, bias), False)
    layer = IncrementalConv(taps, {"c": chain})
    assert torch.equal(layer("c", x, base_weight, bias), taps.values["c"].out)  # no change: the base output
    weight = base_weight.clone()
    weight[1, 0, 0, 0] += 1.0
    weight[4, 1, 2, 2] -= 1.0  # channels 1 and 4 of 6 change
    out = layer("c", x, weight, bias)
    assert layer.incremental_calls == 2
    torch.testing.assert_close(out, chain(x, weight, bias))
    unchanged = [0, 2, 3, 5]
    assert torch.equal(out[:, unchanged], taps.values["c"].out[:, unchanged])


@pytest.mark.skipif(kernel("perturb_quantize_changes") is None, reason="numba not installed")
def test_changed_channels_come_from_the_prologue_list(monkeypatch):
    def no_scan(new, old):
        raise AssertionError("the incremental convolution scanned the weight")

    monkeypatch.setattr(base_reuse, "changed_entries", no_scan)
    step, losses, _ = _run("sequential", beta_min=0.9999)
    _, dense_losses, _ = _run("inplace", beta_min=0.9999)
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    assert step.runner.sequential_graph.get_submodule(INCREMENTAL_CONV).incremental_calls > 0
