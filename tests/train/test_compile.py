"""train_step(..., compile=True): the base pass and the branch forwards through torch.compile
(inductor, CPU) give the eager step's estimate.

Tolerance: G = c * v / eps with c = (L+ - L-) / 2. Inductor computes the losses with its own
kernels (here they came out bit-identical; a last-bit difference is allowed) and the STE gradient
with sums in another order, so v (through g_hat) differs in its last bits. The estimate may
therefore differ by |G| * (|dc| / |c| + 1e-5): the finite difference's own rounding, relative to
c, plus a relative 1e-5 for the guide.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import qzo_fx
from qzo_fx.errors import TrainStepError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(32, 64), nn.Dropout(0.2), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _run(estimator, strategy, compile):
    """Per step: base loss, branch losses, every .grad; the parameters at the end (AdamW)."""
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Net(), qzo_fx.QuantConfig(weight_bits=2))
    step = qzo_fx.train_step(qm, ce, estimator, strategy=strategy, compile=compile)
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-2)
    steps = []
    for i, batch in enumerate(_batches()):
        torch.manual_seed(10 + i)  # the dropout masks of this step
        opt.zero_grad(set_to_none=True)
        loss = float(step(batch))
        steps.append((loss, list(step.stats.last_branch_losses), {n: p.grad.clone() for n, p in qm.named_parameters()}))
        opt.step()
    return steps, {n: p.detach().clone() for n, p in qm.named_parameters()}


def _ulps(x: float, k: int = 4) -> float:
    return k * abs(x) * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("strategy", ["sequential", "inplace"])
def test_compiled_fogzo_gives_the_eager_estimate(strategy):
    counters.clear()
    estimator = qzo_fx.FOGZO(beta_min=0.9, schedule="constant", seed=1)
    eager, _ = _run(estimator, strategy, compile=False)
    compiled, _ = _run(estimator, strategy, compile=True)
    assert counters["stats"]["unique_graphs"] >= 2  # the base pass and the branch forward were compiled
    for (le, be, ge), (lc, bc, gc) in zip(eager, compiled):
        assert abs(le - lc) <= _ulps(le)
        assert all(abs(a - b) <= _ulps(a) for a, b in zip(be, bc))  # same dropout masks as eager
        c_e, c_c = (be[0] - be[1]) / 2, (bc[0] - bc[1]) / 2
        assert c_e != 0
        for name in ge:
            if name.endswith("bias"):  # outside the perturbed set: the STE gradient, compiled backward
                torch.testing.assert_close(gc[name], ge[name], rtol=1e-5, atol=1e-7)
            else:
                bound = float(ge[name].abs().max()) * (abs(c_c - c_e) / abs(c_e) + 1e-5)
                assert float((gc[name] - ge[name]).abs().max()) <= bound, name


def test_compiled_ste_trains_like_eager():
    eager, eager_params = _run(qzo_fx.STE(), "auto", compile=False)
    compiled, compiled_params = _run(qzo_fx.STE(), "auto", compile=True)
    for (le, _, ge), (lc, _, gc) in zip(eager, compiled):
        assert abs(le - lc) <= _ulps(le)
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-5, atol=1e-7)
    for name, value in eager_params.items():
        torch.testing.assert_close(compiled_params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["batched", "lean"])
def test_compile_refuses_strategies_it_cannot_run(strategy):
    qm = qzo_fx.prepare(Net(), qzo_fx.QuantConfig(weight_bits=2))
    with pytest.raises(TrainStepError, match=f"compile=True with strategy='{strategy}'"):
        qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0), strategy=strategy, compile=True)


def test_compile_setting_is_validated():
    qm = qzo_fx.prepare(Net(), qzo_fx.QuantConfig(weight_bits=2))
    with pytest.raises(TrainStepError, match="compile='yes' is invalid"):
        qzo_fx.train_step(qm, ce, qzo_fx.STE(), compile="yes")
