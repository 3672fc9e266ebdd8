"""A prepared model returns what the float model returns: its output container's type, the
branch it takes for arguments left at None (whole-model and partial capture), and its cache
after a failed export retry."""
from __future__ import annotations

import collections
import io

import pytest
import torch
import torch.nn as nn

import qzo_fx

FLOAT = qzo_fx.QuantConfig(weight=None)


class SegHead(nn.Module):
    """Returns an OrderedDict, as torchvision's segmentation models (deeplabv3, lraspp, fcn) do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        out = collections.OrderedDict()
        out["out"] = self.conv(x)
        out["aux"] = self.aux(torch.relu(out["out"]))
        return out


@pytest.mark.parametrize("with_examples", [True, False])
def test_ordered_dict_output_stays_an_ordered_dict(with_examples):
    torch.manual_seed(0)
    model, x = SegHead().eval(), torch.randn(2, 3, 8, 8)
    qm = qzo_fx.prepare(model, FLOAT, example_inputs=(x,) if with_examples else None)
    buffer = io.BytesIO()
    torch.save(qm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for prepared in (qm, loaded):
        for training in (False, True):
            model.train(training)
            out, expected = prepared.train(training)(x), model(x)
            assert type(out) is collections.OrderedDict
            assert list(out) == list(expected) == ["out", "aux"]
            assert all(torch.allclose(out[k], expected[k], atol=1e-6) for k in expected)


class Attention(nn.Module):
    """The Hugging Face pattern (WavLM's position_bias, Longformer's position_ids): the first
    layer is called with None and computes the value, the next layers are given it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bias_proj = nn.Linear(8, 8)

    def forward(self, x, position_bias=None):
        if position_bias is None:
            position_bias = torch.sigmoid(self.bias_proj(x))
        return self.lin(x) * position_bias, position_bias


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Attention(), Attention()])
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent: neither a symbolic trace nor torch.export captures the root
            x = x * 2
        position_bias = None
        for layer in self.layers:
            x, position_bias = layer(self.drop(x), position_bias=position_bias)
        return x


def test_partial_capture_takes_the_branch_for_an_argument_left_at_none():
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(2, 4, 8)
    qm = qzo_fx.prepare(model, FLOAT, example_inputs=(x,))
    assert {"layers.0", "layers.1"} <= set(qm.qzo_partial.graph)
    for training in (False, True):
        model.train(training), qm.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert torch.allclose(qm(x), expected, atol=1e-6)
    # The first layer's graph holds the branch for None: a value given for it is refused.
    with pytest.raises(qzo_fx.InputError, match="position_bias"):
        qm.layers[0](x, position_bias=torch.ones(2, 4, 8))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, mask=None):
        y = self.lin(x)
        if mask is not None:
            y = y * mask
        return y


def test_whole_model_argument_captured_as_none_takes_none_and_refuses_a_value():
    torch.manual_seed(0)
    model, x = Masked().eval(), torch.randn(2, 8)
    qm = qzo_fx.prepare(model, FLOAT, example_inputs=(x,))
    assert qm.meta["qzo.capture"].method == "symbolic"
    buffer = io.BytesIO()
    torch.save(qm, buffer)
    buffer.seek(0)
    for prepared in (qm, torch.load(buffer, weights_only=False)):
        assert torch.allclose(prepared(x, mask=None), model(x), atol=1e-6)  # by keyword, as layers are called
        with pytest.raises(qzo_fx.InputError, match="'mask'"):
            prepared(x, torch.ones(2, 8))


class _Config:
    use_cache = True


class CachingModel(nn.Module):
    """Returns a cache while ``config.use_cache`` (as Hugging Face models do); its data-dependent
    branch makes every export retry fail, so partial capture prepares it."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.mean() > 0:
            x = x * 2
        y = self.lin(x)
        return (y, y * 2) if self.config.use_cache else (y,)


def test_failed_export_retries_leave_the_cache_on():
    torch.manual_seed(0)
    model, x = CachingModel().eval(), torch.randn(2, 8)
    qm = qzo_fx.prepare(model, FLOAT, example_inputs=(x,))
    assert hasattr(qm, "qzo_partial") and qm.config.use_cache
    out, expected = qm.eval()(x), model(x)
    assert len(out) == len(expected) == 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, expected))


def test_a_partially_captured_model_saves_and_loads_whole():
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 4, 8)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,)).eval()
    buffer = io.BytesIO()
    torch.save(qm, buffer)  # re-traced on load with the part's own tracer
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
