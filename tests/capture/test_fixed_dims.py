"""A dimension torch.export fixed at capture is checked on every call: a graph specialized to a
size does not always fail at another one, and a wrong-length output must not come back silently."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qzo_fx


class TeacherForcedDecoder(nn.Module):
    """Research code's decoder loop: one step per target token, in Python. Symbolic tracing cannot
    iterate over a traced size, and torch.export unrolls the example's steps."""

    def __init__(self):
        super().__init__()
        self.emb, self.cell, self.out = nn.Embedding(20, 8), nn.GRUCell(8, 16), nn.Linear(16, 20)

    def forward(self, tgt):
        h, steps = tgt.new_zeros(tgt.shape[0], 16, dtype=torch.float32), []
        for t in range(tgt.size(1)):
            h = self.cell(self.emb(tgt[:, t]), h)
            steps.append(self.out(h))
        return torch.stack(steps, 1)


def test_a_call_at_another_size_of_a_fixed_dimension_raises_instead_of_a_shorter_output():
    torch.manual_seed(0)
    model = TeacherForcedDecoder()
    tgt = torch.randint(0, 20, (2, 5))
    with pytest.warns(UserWarning, match=r"'tgt': 'dim 1 = 5'"):
        qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(tgt,))
    other_batch = torch.randint(0, 20, (3, 5))
    assert qm.eval()(other_batch).shape == model.eval()(other_batch).shape == (3, 5, 20)
    longer = torch.randint(0, 20, (2, 9))
    assert model(longer).shape == (2, 9, 20)  # the float model takes it ...
    with pytest.raises(qzo_fx.InputError, match=r"'tgt' with dimension 1 of size 5 only, and this call has 9"):
        qm(longer)  # ... the prepared one says it cannot, instead of returning 5 steps
