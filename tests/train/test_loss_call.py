"""train_step's calling convention, loss_fn(model, batch), as users first get it wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx


def _prepared() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(torch.randn(4, 6),))


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), F.cross_entropy], ids=["module", "functional"])
def test_a_torch_loss_is_refused_with_the_convention(loss):
    with pytest.raises(qzo_fx.TrainStepError, match=r"loss_fn\(model, batch\).*lambda m, b"):
        qzo_fx.train_step(_prepared(), loss, qzo_fx.STE())


def test_a_loss_of_output_and_target_names_the_convention_and_keeps_the_cause():
    qm = _prepared()
    step = qzo_fx.train_step(qm, lambda out, target: F.cross_entropy(out, target), qzo_fx.STE())
    with pytest.raises(qzo_fx.TrainStepError, match=r"loss_fn\(model, batch\) raised TypeError") as info:
        step((torch.randn(4, 6), torch.randint(0, 3, (4,))))
    assert isinstance(info.value.__cause__, TypeError)
    assert all(p.grad is None for p in qm.parameters())  # nothing written


def test_step_of_two_arguments_is_the_step_of_their_tuple():
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    grads = []
    for call in (lambda step: step(x, y), lambda step: step((x, y))):
        qm = _prepared()
        step = qzo_fx.train_step(qm, lambda m, b: F.cross_entropy(m(b[0]), b[1]), qzo_fx.STE())
        loss = call(step)
        grads.append((float(loss), [p.grad.clone() for p in qm.parameters() if p.grad is not None]))
    assert grads[0][0] == grads[1][0] and grads[0][1]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
