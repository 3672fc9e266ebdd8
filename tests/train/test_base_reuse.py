"""Sequential branches reuse the base pass's first layers: same losses and estimate as dense
branches, and a dense fallback wherever the reuse would not be exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.train import base_reuse
from qzo_fx.train import prologue
from qzo_fx.train.base_reuse import INCREMENTAL, TAPS
from qzo_fx.train.compiled import kernel


class Net(nn.Module):
    def __init__(self, inplace_relu: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 4)
        self.act = nn.ReLU(inplace=inplace_relu)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def twice(model, batch):
    # The model called on two different inputs: only one of them is the tapped base input.
    return F.cross_entropy(model(batch[0]), batch[1]) + F.cross_entropy(model(2 * batch[0]), batch[1])


@pytest.fixture(autouse=True)
def small_layers_count(monkeypatch):
    monkeypatch.setattr(base_reuse, "MIN_MACS", 0)  # exercise the path on test-sized layers


def train_and_record(qm, step, batch, weight, lr, steps):
    """``steps`` steps with plain SGD; each step's branch losses and ``weight``'s estimate."""
    losses, grads = [], []
    for _ in range(steps):
        qm.zero_grad(set_to_none=True)
        step(batch)
        losses.append(step.stats.last_branch_losses)
        grads.append(qm.get_parameter(weight).grad.clone())
        with torch.no_grad():  # move the weights so later steps see new codes
            for p in qm.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
    return step, torch.tensor(losses), torch.stack(grads)


def _run(strategy, loss_fn=ce, inplace_relu=False, steps=3):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Net(inplace_relu), qzo_fx.QuantConfig(weight_bits=4))
    batch = (torch.randn(16, 64), torch.randint(0, 4, (16,)))
    step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(total_steps=10, beta_min=0.99, seed=5), strategy=strategy)
    return train_and_record(qm, step, batch, "fc1.weight", 0.05, steps)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch-only"])
@pytest.mark.parametrize("loss_fn,inplace_relu", [(ce, False), (ce, True), (twice, False)])
def test_incremental_branches_equal_dense_branches(loss_fn, inplace_relu, compiled, monkeypatch):
    if not compiled:  # as without numba: the layer scans, and multiplies with torch ops
        for module in (base_reuse, prologue):
            monkeypatch.setattr(module, "kernel", lambda name: None)
    step, losses, grads = _run("sequential", loss_fn, inplace_relu)
    _, dense_losses, dense_grads = _run("inplace", loss_fn, inplace_relu)
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, dense_grads, rtol=1e-4, atol=1e-5)
    incremental = step.runner.sequential_graph.get_submodule(INCREMENTAL)
    assert incremental.incremental_calls > 0
    if loss_fn is twice:  # the call on 2x is not the tapped input: computed densely
        assert incremental.incremental_calls < incremental.calls


def test_graphs_show_the_taps_and_the_incremental_layer():
    step, _, _ = _run("sequential", steps=1)
    assert f"{TAPS}('linear'" in step.base_graph.code.replace('"', "'")
    assert INCREMENTAL in step.runner.sequential_graph.code
    assert INCREMENTAL not in step.branch_graph.code  # the batched/vmapped graph stays plain


def test_dense_change_falls_back(monkeypatch):
    monkeypatch.setattr(base_reuse, "MAX_DENSITY", 0.0)
    step, losses, _ = _run("sequential", steps=1)
    _, dense_losses, _ = _run("inplace", steps=1)
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    assert step.runner.sequential_graph.get_submodule(INCREMENTAL).incremental_calls == 0


def test_only_sequential_and_auto_tap_the_base_pass():
    for strategy, tapped in (("batched", False), ("inplace", False), ("lean", False), ("auto", True)):
        step, _, _ = _run(strategy, steps=1)
        assert (step.base_graph is not None) == tapped, strategy


@pytest.mark.parametrize("gather_max", [10**9, 0], ids=["column-gather", "csr-product"])
def test_sparse_products_equal_the_dense_layer(monkeypatch, gather_max):
    monkeypatch.setattr(base_reuse, "GATHER_MAX", gather_max)
    taps = base_reuse.BaseTaps()
    layer = base_reuse.IncrementalLinear(taps)
    x, base_weight, bias = torch.randn(3, 5, 40), torch.randn(24, 40).round(), torch.randn(24)
    taps("fc", x, base_weight, F.linear(x, base_weight, bias))
    weight = base_weight.clone()
    weight.view(-1)[torch.randperm(weight.numel())[:9]] += 1.0  # 9 of 960 codes move one step
    out = layer("fc", x, weight, bias)
    assert layer.incremental_calls == 1
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def test_changed_entries_agree_on_every_path():
    old = torch.randn(1000)
    new = old.clone()
    new[[3, 500, 999]] += 1.0
    expected = torch.tensor([3, 500, 999])
    assert torch.equal(base_reuse.changed_entries(new, old), expected)  # numpy path
    assert torch.equal(base_reuse.changed_entries(new.bfloat16(), old.bfloat16()), expected)  # torch path


@pytest.mark.skipif(kernel("add_weight_changes") is None, reason="numba not installed")
def test_compiled_product_has_the_bits_of_the_column_gather(monkeypatch):
    taps = base_reuse.BaseTaps()
    layer = base_reuse.IncrementalLinear(taps)
    x, base_weight, bias = torch.randn(7, 40), torch.randn(24, 40).round(), torch.randn(24)
    taps("fc", x, base_weight, F.linear(x, base_weight, bias))
    weight = base_weight.clone()
    weight.view(-1)[torch.randperm(weight.numel())[:30]] -= 1.0
    compiled = layer("fc", x, weight, bias)
    monkeypatch.setattr(base_reuse, "kernel", lambda name: None)  # torch's index_add path
    assert torch.equal(compiled, layer("fc", x, weight, bias))


@pytest.mark.skipif(kernel("perturb_quantize_changes") is None, reason="numba not installed")
def test_branches_take_the_change_list_from_the_prologue(monkeypatch):
    # The compiled perturbed q/dq lists the changed weights itself: no scan in the layer.
    def no_scan(new, old):
        raise AssertionError("the incremental layer scanned the weight")

    monkeypatch.setattr(base_reuse, "changed_entries", no_scan)
    step, losses, grads = _run("sequential")
    _, dense_losses, dense_grads = _run("inplace")
    torch.testing.assert_close(losses, dense_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, dense_grads, rtol=1e-4, atol=1e-5)
    assert step.runner.sequential_graph.get_submodule(INCREMENTAL).incremental_calls > 0


@pytest.mark.skipif(kernel("perturb_quantize_changes") is None, reason="numba not installed")
@pytest.mark.parametrize("room", [4000, 5], ids=["listed", "overflow"])
def test_change_list_of_the_compiled_quantizer(room):
    g = torch.Generator().manual_seed(1)
    theta, v = torch.randn(30, 50, generator=g), torch.randn(30, 50, generator=g)
    eps, scale, zero = torch.full((30,), 0.05), torch.full((30,), 0.25), torch.zeros(30)
    base, out = torch.empty_like(theta), torch.empty_like(theta)
    rows = lambda t: t.numpy()
    kernel("perturb_quantize_rows")(rows(base), rows(theta), rows(v), rows(eps * 0), rows(scale), rows(zero),
                                    np.float32(1), np.float32(-2), np.float32(1))
    base.view(-1)[7] = float("nan")  # NaN != NaN: listed as a change, as by the scan
    where = torch.empty(room, dtype=torch.int64)
    count = kernel("perturb_quantize_changes")(rows(out), rows(theta), rows(v), rows(eps), rows(scale), rows(zero),
                                               np.float32(1), np.float32(-2), np.float32(1), rows(base), rows(where))
    expected = base_reuse.changed_entries(out, base)
    assert count == expected.numel() > 5
    assert torch.equal(where[:min(count, room)], expected[:room])


@pytest.mark.skipif(kernel("perturb_quantize_changes") is None, reason="numba not installed")
def test_threaded_kernels_leave_torch_thread_count_alone():
    # numba's OpenMP pool is torch's: its parallel regions must not change the user's setting.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        step, _, _ = _run("sequential", steps=1)
        assert step.runner.sequential_graph.get_submodule(INCREMENTAL).incremental_calls > 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
