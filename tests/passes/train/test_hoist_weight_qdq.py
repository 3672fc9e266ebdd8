"""The sequential branch graph quantizes its weights in one foreach prologue: bit-identical
values, every per-tensor/per-channel weight hoisted, per-group and 1-bit weights left in place."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.train.branches import BranchModel, branch_graph, sequential_graph
from qzo_fx.quant.ops import fake_quant_kernel
from qzo_fx.train.prologue import PROLOGUE


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mixed = nn.Linear(8, 16)
        self.grouped = nn.Linear(16, 64)
        self.sign = nn.Linear(64, 5)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.sign(F.relu(self.grouped(F.relu(self.mixed(h)))))


CONFIG = qzo_fx.QuantConfig(weight_bits=3, overrides={
    "conv": {"weight": {"granularity": "per_tensor"}},
    "mixed": {"weight": {"symmetric": False, "bits": 4}},              # unsigned grid, zero point per channel
    "grouped": {"weight": {"granularity": "per_group", "group_size": 8}},
    "sign": {"weight": {"bits": 1}},
})


def _prepared():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    qm = qzo_fx.prepare(Net(), CONFIG, example_inputs=(x,))
    names = ["conv.weight", "mixed.weight", "grouped.weight", "sign.weight"]
    return qm, names, x


def test_per_tensor_and_per_channel_weights_are_hoisted_group_and_sign_stay():
    qm, names, _ = _prepared()
    gm = sequential_graph(qm, names, taps=None)
    hoisted = [w.quantizer for w in getattr(gm, PROLOGUE).weights]
    assert hoisted == ["qzo_quant.conv_weight", "qzo_quant.mixed_weight"]
    kernels = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fake_quant_kernel]
    assert [n.args[0].target for n in kernels] == ["theta_grouped_weight"]  # per-group stays in the graph
    assert "fake_sign_kernel" in gm.code


def test_prologue_values_and_losses_are_bit_identical():
    qm, names, x = _prepared()
    plain, hoisted = branch_graph(qm, names), sequential_graph(qm, names, taps=None)
    prologue = getattr(hoisted, PROLOGUE)
    values = [qm.get_parameter(n).detach() + 0.01 * torch.randn_like(qm.get_parameter(n)) for n in names]
    quantized = [v.clone() for v in values]
    prologue(quantized)
    for w in prologue.weights:
        q = qm.get_submodule(w.quantizer)
        qmin, qmax = q.spec.qrange
        expected = fake_quant_kernel(values[w.index], q.scale, q.zero_point, qmin, qmax, q.axis, 0)
        assert torch.equal(quantized[w.index], expected), w.quantizer
    with torch.no_grad():
        assert torch.equal(BranchModel(hoisted, qm, quantized)(x), BranchModel(plain, qm, values)(x))


def test_sequential_steps_match_inplace_with_the_prologue():
    qm, _, x = _prepared()
    loss_fn = lambda m, b: m(b).square().mean()
    estimates, steps = {}, {}
    for strategy in ("sequential", "inplace"):
        steps[strategy] = qzo_fx.train_step(qm, loss_fn, qzo_fx.NSPSA(n=2, seed=3), strategy=strategy)
        qm.zero_grad(set_to_none=True)
        steps[strategy](x)
        estimates[strategy] = (steps[strategy].stats.last_branch_losses, qm.mixed.weight.grad.clone())
    assert hasattr(steps["sequential"].runner.sequential_graph, PROLOGUE)
    assert estimates["sequential"][0] == estimates["inplace"][0]
    torch.testing.assert_close(estimates["sequential"][1], estimates["inplace"][1], rtol=0, atol=0)


def test_compiled_perturb_and_quantize_equals_perturbed_then_prologue():
    from qzo_fx.train.branches import perturbed
    from qzo_fx.train.compiled import kernel

    if kernel("perturb_quantize_rows") is None:
        pytest.skip("numba not installed")
    qm, names, _ = _prepared()
    prologue = getattr(sequential_graph(qm, names, taps=None), PROLOGUE)
    params = [qm.get_parameter(n).detach().clone() for n in names]
    params[1][0, 0] = float("nan")  # NaN must survive the clamps, as in torch
    g = torch.Generator().manual_seed(3)
    eps = [torch.tensor(0.01), torch.rand(16, 1, generator=g) * 0.05, torch.tensor(0.01), torch.tensor(0.01)]
    deltas = [(torch.randn(p.shape, generator=g), e) for p, e in zip(params, eps)]
    for sign in (1.0, -1.0):
        fused = [torch.empty_like(p) for p in params]
        done = prologue.perturb_and_quantize(fused, params, deltas, sign)
        assert done == {w.index for w in prologue.weights}  # per-tensor 4-D conv and unsigned per-channel
        for j in set(range(len(params))) - done:
            perturbed(params[j], deltas[j], sign, out=fused[j])
        prologue(fused, skip=done)
        reference = [perturbed(p, d, sign, out=torch.empty_like(p)) for p, d in zip(params, deltas)]
        prologue(reference)
        for a, b in zip(fused, reference):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_prologue_follows_replaced_weights_and_scales_it_has_seen():
    # The prologue keeps numpy views of the tensors it has seen; a parameter given new memory
    # or a scale changed in place must still be read afresh.
    from qzo_fx.train.branches import perturbed

    qm, names, _ = _prepared()
    prologue = getattr(sequential_graph(qm, names, taps=None), PROLOGUE)
    params = [qm.get_parameter(n).detach() for n in names]
    deltas = [(torch.randn(p.shape), torch.tensor(0.01)) for p in params]

    def quantized():
        values = [torch.empty_like(p) for p in params]
        done = prologue.perturb_and_quantize(values, params, deltas, 1.0)
        for j in set(range(len(params))) - done:
            perturbed(params[j], deltas[j], 1.0, out=values[j])
        prologue(values, skip=done)
        reference = [perturbed(p, d, 1.0, out=torch.empty_like(p)) for p, d in zip(params, deltas)]
        prologue(reference)
        return values, reference

    quantized()
    params[0] = params[0] * 3.0                       # new memory for the conv weight
    with torch.no_grad():
        qm.qzo_quant.get_submodule("mixed_weight").scale.mul_(0.5)  # a scale changed in place
    values, reference = quantized()
    for a, b in zip(values, reference):
        assert torch.equal(a, b)
