"""A prepared model takes the integer widths its float model takes (int32 token ids where the
example had int64), and names the dtype where it cannot take one."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qzo_fx


class TokenModel(nn.Module):
    """Embedding + head, captured with torch.export (as every Hugging Face model is), whose
    guards check every input's dtype."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, input_ids, scale):
        h = self.embed(input_ids.long()) * scale  # a no-op .long() asserts int64 in the exported graph
        return self.head(h).mean(1)


def _prepared():
    torch.manual_seed(0)
    model = TokenModel()
    ids, scale = torch.randint(0, 50, (2, 6)), torch.ones(1)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(activation_bits=8), example_inputs=(ids, scale), capture="export")
    assert qm.meta["qzo.capture"].method == "export"
    return model, qm, ids, scale


@pytest.mark.parametrize("dtype", [torch.int32])
def test_narrower_integer_ids_give_the_same_output(dtype):
    model, qm, ids, scale = _prepared()
    qm.eval()
    assert model(ids.to(dtype), scale).shape == (2, 4)  # the float model takes them
    torch.testing.assert_close(qm(ids.to(dtype), scale), qm(ids, scale), rtol=0, atol=0)
    qm.train()
    qm(ids[:1, :3].to(dtype), scale).sum().backward()  # another shape too, with gradients
    assert qm.embed.weight.grad is not None


def test_a_float_input_of_another_dtype_is_named():
    _, qm, ids, scale = _prepared()
    with pytest.raises(qzo_fx.InputError, match=r"'scale' as torch.float32, and this call passes torch.float64"):
        qm(ids, scale.double())
