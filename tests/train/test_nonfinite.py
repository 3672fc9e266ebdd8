"""No NaN or inf reaches ``.grad`` silently: a non-finite loss, STE gradient or estimate raises
naming it, or with ``on_nonfinite="skip"`` clears the gradients and is counted.

The model is a random-init one whose STE backward really produces NaN: features scaled by their
RMS (``sqrt`` of a mean of squares) after a layer whose quantizer scale is forced tiny. Its
quantized weights are then ~1e-29, the features' squares underflow to 0, the loss stays finite
and the derivative of ``sqrt`` at 0 puts NaN into the first layer's gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx

STRATEGIES = ("inplace", "sequential", "batched", "lean")


class RMSScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32, bias=False), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) * h.square().mean(-1, keepdim=True).sqrt()


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _broken(scale=1e-30):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(RMSScaled(), qzo_fx.QuantConfig(weight_bits=4))
    with torch.no_grad():
        qm.qzo_quant.fc1_weight.scale.fill_(scale)  # e.g. a calibration gone wrong
    batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
    return qm, batch


def test_the_model_really_has_nan_gradients_with_a_finite_loss():
    qm, batch = _broken()
    loss = ce(qm, batch)
    loss.backward()
    assert torch.isfinite(loss) and not torch.isfinite(qm.fc1.weight.grad).all()


@pytest.mark.parametrize("estimator", [qzo_fx.STE(), qzo_fx.FOGZO(total_steps=10, seed=0),
                                       qzo_fx.FOGZO(two_sided=False, total_steps=10, seed=0)],
                         ids=["ste", "fogzo", "fogzo-1s"])
def test_a_nan_ste_gradient_raises_naming_the_parameter(estimator):
    qm, batch = _broken()
    step = qzo_fx.train_step(qm, ce, estimator)
    with pytest.raises(qzo_fx.NonFiniteLossError, match=r"STE gradient of fc1\.weight.*on_nonfinite='skip'"):
        step(batch)
    assert all(p.grad is None for p in qm.parameters())  # nothing left for an optimizer to apply
    assert step.stats.nonfinite_skips == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_skip_clears_the_step_and_training_goes_on_finite(strategy):
    qm, batch = _broken()
    before = {n: p.detach().clone() for n, p in qm.named_parameters()}
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(total_steps=10, seed=0), strategy=strategy, on_nonfinite="skip")
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with pytest.warns(RuntimeWarning, match="fc1.weight.*skipped"):
            step(batch)
        opt.step()
    assert step.stats.nonfinite_skips == 3 and step.stats.steps == 3
    for name, p in qm.named_parameters():
        assert torch.equal(p, before[name]), name  # every step skipped: AdamW had no gradient to apply
    # Once the scale is sane again, the same step trains.
    with torch.no_grad():
        qm.qzo_quant.fc1_weight.scale.fill_(0.05)
    opt.zero_grad(set_to_none=True)
    step(batch)
    opt.step()
    assert step.stats.nonfinite_skips == 3
    assert all(torch.isfinite(p).all() for p in qm.parameters()) and qm.fc1.weight.grad is not None


def test_a_non_finite_estimate_raises():
    # A denormal scale: eps ~ 3e-41 and 1/eps overflows, so n-SPSA's estimate c u / eps is not finite.
    qm, batch = _broken(scale=1e-40)
    step = qzo_fx.train_step(qm, ce, qzo_fx.NSPSA(n=2, seed=0, perturb="quantized"))
    with pytest.raises(qzo_fx.NonFiniteLossError, match=r"estimate of fc1\.weight"):
        step(batch)
    assert all(p.grad is None for p in qm.parameters())


def test_a_non_finite_loss_raises_before_any_update():
    qm, batch = _broken(scale=0.05)
    bad = (torch.full_like(batch[0], float("nan")), batch[1])
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0))
    with pytest.raises(qzo_fx.NonFiniteLossError, match="base loss"):
        step(bad)
    coded = qzo_fx.to_integer_codes(qm)
    codes = coded.qzo_quant.fc1_weight.codes.clone()
    with pytest.raises(qzo_fx.NonFiniteLossError, match="branch losses"):
        qzo_fx.train_step(coded, ce, qzo_fx.ZOQO(seed=0))(bad)
    assert torch.equal(coded.qzo_quant.fc1_weight.codes, codes)  # ZOQO does not move on a NaN


def test_unchecked_reads_nothing_and_says_so_in_the_statistics():
    qm, batch = _broken(scale=0.05)
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(total_steps=10, seed=0), on_nonfinite="unchecked")
    step(batch)
    assert step.stats.last_branch_losses == [] and step.stats.forward_passes == 3
    with pytest.raises(qzo_fx.TrainStepError, match="on_nonfinite"):
        qzo_fx.train_step(qm, ce, qzo_fx.STE(), on_nonfinite="ignore")


class Amplified(nn.Module):
    """A gradient of ~1e21 per entry, finite: the kind a random-init network reaches when
    BatchNorm normalizes over two samples at 1x1 (its backward multiplies by 1/sqrt(var + eps))."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x)) * 1e21


@pytest.mark.parametrize("estimator", [qzo_fx.STE(), qzo_fx.FOGZO(total_steps=10, seed=0)], ids=["ste", "fogzo"])
def test_a_huge_finite_gradient_is_not_reported_non_finite(estimator):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Amplified(), qzo_fx.QuantConfig(weight_bits=8))
    batch = (torch.randn(8, 16), torch.randint(0, 4, (8,)))
    step = qzo_fx.train_step(qm, lambda m, b: m(b[0]).mean(), estimator)
    step(batch)
    grad = qm.fc1.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e10
    assert float(grad.square().sum()) == float("inf")  # its float32 2-norm overflows: the old check's false alarm
    assert step.stats.nonfinite_skips == 0


class Faint(nn.Module):
    """Outputs of ~1e-9 against a loss of ~1: a perturbation's effect on the loss is below what
    float32 resolves, as in a random-init depth-estimation head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x) * 1e-9


def test_branch_losses_equal_to_the_base_loss_are_counted_and_warned_once():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Faint(), qzo_fx.QuantConfig(weight_bits=8))
    batch = torch.randn(8, 16)
    loss_fn = lambda m, x: (m(x) - 1.0).square().mean()  # noqa: E731
    step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(total_steps=10, seed=0))
    with pytest.warns(RuntimeWarning, match=r"branch losses equal the base loss .* stats.flat_estimates"):
        step(batch)
    base = float(loss_fn(qm, batch))
    assert step.stats.last_branch_losses == [base, base] and step.stats.flat_estimates == 1
    assert torch.count_nonzero(qm.fc.weight.grad) == 0  # the estimate itself, as the method defines it
    step(batch)  # counted again, not warned again
    assert step.stats.flat_estimates == 2
