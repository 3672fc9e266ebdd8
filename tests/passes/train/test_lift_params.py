"""The branch graph's inputs are identifiers whatever the modules are called."""
from __future__ import annotations

import torch
import torch.nn as nn

import qzo_fx


def test_fogzo_steps_on_modules_whose_names_are_not_identifiers():
    # torchvision's RegNet names its blocks "block1-0": the lifted inputs must still be valid code.
    model = nn.Sequential()
    model.add_module("block1-0", nn.Linear(8, 8))
    model.add_module("head", nn.Linear(8, 2))
    x = torch.randn(4, 8)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    before = qm.get_parameter("block1-0.weight").detach().clone()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    for strategy in ("sequential", "batched", "lean", "inplace"):
        step = qzo_fx.train_step(qm, lambda m, b: m(b).square().mean(), qzo_fx.FOGZO(total_steps=2, seed=0),
                                 strategy=strategy)
        opt.zero_grad()
        assert torch.isfinite(step(x))
        assert torch.isfinite(qm.get_parameter("block1-0.weight").grad).all()
        opt.step()
    assert not torch.equal(qm.get_parameter("block1-0.weight"), before)
