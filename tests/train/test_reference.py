"""Every fast path against the plain reference (qzo_fx.train.reference): the same estimate for the
same seed, for each estimator, strategy and noise backend (the compiled kernels on and off).

Tolerances, and why:
* branch losses: bitwise for inplace, sequential and lean. The reference evaluates the model with
  ``torch.func.functional_call`` at ``addcmul(theta, v, eps)``; the strategies compute the same
  values with the same operations (the compiled q/dq is bit-identical to torch's), and a 2-bit
  weight's code only depends on which side of a rounding boundary it lands. ``batched`` runs the
  GEMMs stacked, in another summation order: 1e-6 relative.
* the estimate: the fast path folds ``sqrt(1 - beta)`` into the noise draw, computes the guide
  norms from row norms and writes ``G = v * (c / (n eps))`` in one pass, where the reference writes
  ``sqrt(1 - beta) u``, ``||eps g||`` and ``(c v / eps) / n``: a few float32 roundings apart,
  2e-5 relative to the largest entry (measured: below 1e-6). Batched: differences of losses
  that agree to 1e-6, so 1e-3.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.quant.ops import expand_param
from qzo_fx.train import compiled, reference
from qzo_fx.train.perturbed import EPS_BAR
from qzo_fx.train.rng import RngState

STRATEGIES = ("inplace", "sequential", "batched", "lean")
BACKENDS = ("torch", pytest.param("compiled", marks=pytest.mark.skipif(not compiled.available(), reason="no numba")))


class Net(nn.Module):
    """Linear, BatchNorm and dropout: every branch-semantics rule matters here."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.drop, self.fc2 = nn.Dropout(0.2), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _setup(codes=False):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Net(), qzo_fx.QuantConfig(weight_bits=2 if not codes else 4))
    if codes:
        qzo_fx.to_integer_codes(qm)
    qm.train()
    return qm, (torch.randn(32, 12), torch.randint(0, 4, (32,)))


class LossAt:
    """The reference's ``loss_at``: the model at other parameter values, same batch and masks,
    buffers restored; records every loss it computes."""

    def __init__(self, qm, names, batch, rng):
        self.qm, self.names, self.batch, self.rng, self.seen = qm, names, batch, rng, []

    def __call__(self, values):
        buffers = {k: v.clone() for k, v in self.qm.named_buffers()}
        self.rng.restore()
        with torch.no_grad():
            loss = ce(lambda x: torch.func.functional_call(self.qm, dict(zip(self.names, values)), (x,)), self.batch)
            for k, v in self.qm.named_buffers():
                v.copy_(buffers[k])
        self.seen.append(float(loss))
        return loss


def _eps(qm, names, eps_float=1e-3):
    out = []
    for name in names:
        q = next((q for q in qm.qzo_quant.children() if q.target == name), None)
        p = qm.get_parameter(name)
        out.append(torch.tensor(eps_float) if q is None else
                   expand_param(q.scale.detach(), p, q.axis, q.group_size) * EPS_BAR["round"])
    return out


def _run_step(qm, batch, estimator, strategy, backend):
    qm.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    rng = RngState.capture()
    step = qzo_fx.train_step(qm, ce, estimator, strategy=strategy, noise=backend)
    step(batch)
    return step, rng


def _close(fast, ref, strategy, rtol=2e-5):
    tol = 1e-3 if strategy == "batched" else rtol
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()) + 1e-12)


def _same_losses(step, loss_at, strategy, skip=0):
    got, want = step.stats.last_branch_losses, loss_at.seen[skip:]
    if strategy == "batched":
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-6)
    else:
        assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", ["two-sided", "one-sided", "unit-norm", "per-tensor", "n=3"])
def test_fogzo_matches_the_reference(variant, strategy, backend):
    qm, batch = _setup()
    settings = dict(beta_min=0.6, schedule="constant", seed=3, two_sided=variant != "one-sided",
                    noise="unit_norm" if variant == "unit-norm" else "per_coordinate",
                    normalize="per_tensor" if variant == "per-tensor" else "global", n=3 if variant == "n=3" else 1)
    step, rng = _run_step(qm, batch, qzo_fx.FOGZO(**settings), strategy, backend)
    names = list(step.names)
    params = [qm.get_parameter(n) for n in names]
    fast = [p.grad.clone() for p in params]
    # The reference's own STE pass from the same random state.
    qm.zero_grad(set_to_none=True)
    rng.restore()
    base = ce(qm, batch)
    grads = reference.ste(base, params)
    qm.load_state_dict(qm.state_dict())
    loss_at = LossAt(qm, names, batch, rng)
    ref = reference.fogzo(loss_at, [p.detach() for p in params], grads, _eps(qm, names), step.laws, beta=0.6,
                          n=settings["n"], step_seed=3, two_sided=settings["two_sided"], base_loss=base.detach(),
                          normalize=settings["normalize"], noise_form=settings["noise"], backend=backend)
    _same_losses(step, loss_at, strategy)
    _close(fast, ref, strategy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("estimator", [qzo_fx.NSPSA(n=2, seed=4), qzo_fx.NSPSA(n=1, noise="gaussian", seed=4),
                                       qzo_fx.ZOSign(n=2, seed=4), qzo_fx.ZOSign(n=2, variant="scalar", seed=4)],
                         ids=["nspsa", "nspsa-gaussian", "zo-sign", "zo-sgd-sign"])
def test_nspsa_and_zo_sign_match_the_reference(estimator, strategy, backend):
    qm, batch = _setup()
    step, rng = _run_step(qm, batch, estimator, strategy, backend)
    names = list(step.names)  # every trainable parameter: BatchNorm's too
    params = [qm.get_parameter(n) for n in names]
    fast = [p.grad.clone() for p in params]
    loss_at = LossAt(qm, names, batch, rng)
    laws = ["gaussian" if estimator.noise == "gaussian" else law for law in step.laws]
    common = dict(n=estimator.n, step_seed=4, backend=backend)
    theta = [p.detach() for p in params]
    if isinstance(estimator, qzo_fx.ZOSign):
        ref = reference.zo_sign(loss_at, theta, _eps(qm, names), laws, variant=estimator.variant, **common)
    else:
        ref = reference.nspsa(loss_at, theta, _eps(qm, names), laws, **common)
    _same_losses(step, loss_at, strategy)
    if isinstance(estimator, qzo_fx.ZOSign) and estimator.variant == "elementwise":
        agree = torch.cat([(a == b).flatten() for a, b in zip(fast, ref)]).float().mean()
        assert agree > (0.99 if strategy == "batched" else 0.9999)  # a sign flips only at ~0
    else:
        _close(fast, ref, strategy, rtol=1e-6 if strategy != "batched" else 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("law", ["gaussian", "uniform"])
def test_zoqo_matches_the_reference(law, strategy, backend):
    qm, batch = _setup(codes=True)
    quantizers = [q for q in qm.qzo_quant.children() if hasattr(q, "codes")]
    before = [q.codes.clone() for q in quantizers]
    steps = [q.step_size(q.codes.float()) for q in quantizers]
    step, rng = _run_step(qm, batch, qzo_fx.ZOQO(lr=0.0, mu=0.0, noise=law, seed=9), strategy, backend)
    after = [q.codes.clone() for q in quantizers]
    for q, codes in zip(quantizers, before):
        q.codes.copy_(codes)
    loss_at = LossAt(qm, list(step.names), batch, rng)
    ref = reference.zoqo(loss_at, before, steps, [q.spec.qrange for q in quantizers], lr=0.0, mu=0.0, law=law,
                         step_seed=9, backend=backend)
    _same_losses(step, loss_at, strategy)
    assert all(torch.equal(a, b) for a, b in zip(after, ref))
