"""Numerics of qzo.fake_quant / qzo.fake_sign, in quantization steps, against an ONNX reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qzo_fx  # noqa: F401  (registers the ops)
from qzo_fx.quant.ops import fake_quant, fake_sign


def onnx_qdq_reference(x, scale, zero_point, qmin, qmax, axis, block):
    """NumPy QuantizeLinear -> DequantizeLinear as the ONNX spec writes it (round half to even)."""
    x = np.asarray(x, np.float32)
    s, z = np.asarray(scale, np.float32), np.asarray(zero_point, np.float32)
    if s.ndim and block:
        s, z = np.repeat(s, block, axis=axis), np.repeat(z, block, axis=axis)
    elif s.ndim:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    q = np.clip(np.rint(x / s) + z, qmin, qmax)
    return ((q - z) * s).astype(np.float32)


def test_ties_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    y = fake_quant(x, torch.tensor(1.0), torch.tensor(0.0), -128, 127, -1, 0, "identity")
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


def test_saturation_asymmetric():
    x = torch.tensor([-10.0, 0.0, 10.0])
    y = fake_quant(x, torch.tensor(0.1), torch.tensor(3.0), 0, 15, -1, 0, "identity")
    assert y.tolist() == pytest.approx([-0.3, 0.0, 1.2])


def test_outputs_lie_on_the_grid_per_channel():
    x = torch.randn(6, 20) * 3
    scale = torch.rand(6) + 0.1
    y = fake_quant(x, scale, torch.zeros(6), -2, 1, 0, 0, "identity")
    codes = y / scale[:, None]
    assert torch.equal(codes, codes.round())
    assert codes.min() >= -2 and codes.max() <= 1


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.floats(-50, 50, width=32), min_size=24, max_size=24),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    layout=st.sampled_from(["tensor", "channel", "group"]),
    scale_exp=st.integers(-4, 2),
)
def test_matches_onnx_reference(data, bits, symmetric, layout, scale_exp):
    x = torch.tensor(data, dtype=torch.float32).reshape(4, 6)
    qmin, qmax = ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1))
    shapes = {"tensor": (), "channel": (4,), "group": (4, 2)}
    axis, block = {"tensor": (-1, 0), "channel": (0, 0), "group": (1, 3)}[layout]
    steps = torch.arange(math.prod(shapes[layout]) or 1).reshape(shapes[layout])
    scale = torch.full(shapes[layout], 2.0**scale_exp) * (1 + steps / 8)
    zero = torch.zeros(shapes[layout]) if symmetric else torch.full(shapes[layout], float(qmax // 3))
    # Exact ties on purpose: half-step multiples of the scale.
    x[0] = torch.arange(6) * scale.reshape(-1)[0] / 2
    got = fake_quant(x, scale, zero, qmin, qmax, axis, block, "identity").numpy()
    want = onnx_qdq_reference(x.numpy(), scale.numpy(), zero.numpy(), qmin, qmax, axis, block)
    np.testing.assert_array_equal(got, want)


def _grad(ste, x, scale, qmin=-4, qmax=3):
    x = x.clone().requires_grad_(True)
    fake_quant(x, scale, torch.tensor(0.0), qmin, qmax, -1, 0, ste).sum().backward()
    return x.grad


def test_identity_ste_passes_gradient_everywhere():
    x = torch.tensor([-100.0, -1.2, 0.3, 2.9, 100.0])
    assert _grad("identity", x, torch.tensor(1.0)).tolist() == [1.0] * 5


@pytest.mark.parametrize("ste", ["clipped", "lsq"])
def test_clipped_ste_zero_outside_range(ste):
    x = torch.tensor([-4.6, -3.9, 0.3, 2.9, 3.6])  # range [-4, 3] in steps of 1
    assert _grad(ste, x, torch.tensor(1.0)).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("ste,formula", [
    ("identity", lambda u: torch.ones_like(u)),
    ("hardtanh", lambda u: (u.abs() <= 1).float()),
    ("tanh", lambda u: 1 - torch.tanh(u) ** 2),
    ("approxsign", lambda u: torch.clamp(2 - 2 * u.abs(), min=0)),
])
def test_sign_surrogates_match_formula(ste, formula):
    scale = torch.tensor(0.5)
    x = torch.linspace(-1.5, 1.5, 31, requires_grad=True)
    y = fake_sign(x, scale, -1, 0, ste)
    assert set(y.tolist()) <= {0.5, -0.5}
    assert fake_sign(torch.zeros(1), scale, -1, 0, ste).item() == 0.5  # sign(0) = +1: two levels only
    y.sum().backward()
    torch.testing.assert_close(x.grad, formula(x.detach() / scale))


def test_lsq_scale_gradient_matches_derivation():
    """d/ds of s*clamp(round(x/s)) with round passed through, times 1/sqrt(N*qmax)."""
    x = torch.tensor([-9.0, -1.3, 0.2, 0.74, 5.0])
    s = torch.tensor(0.5, requires_grad=True)
    qmin, qmax = -4, 3
    fake_quant(x, s, torch.tensor(0.0), qmin, qmax, -1, 0, "lsq").sum().backward()
    v = x / 0.5
    local = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), v.round() - v))
    expected = local.sum() / math.sqrt(x.numel() * qmax)
    torch.testing.assert_close(s.grad, expected)


def test_lsq_scale_gradient_per_channel_matches_finite_difference_inside_range():
    # Inside the range and away from ties the forward is locally s * round(x/s): linear in s.
    x = torch.tensor([[0.26, -0.61], [0.93, 0.12]])
    s = torch.tensor([0.25, 0.5], requires_grad=True)
    fake_quant(x, s, torch.zeros(2), -8, 7, 0, 0, "lsq").sum().backward()
    codes = torch.round(x / s.detach()[:, None])
    raw = (codes - x / s.detach()[:, None]).sum(1)
    torch.testing.assert_close(s.grad, raw / math.sqrt(2 * 7))


def test_per_group_layout_and_vmap():
    w = torch.randn(4, 8)
    scale = torch.rand(4, 2) + 0.1
    y = fake_quant(w, scale, torch.zeros(4, 2), -8, 7, 1, 4, "identity")
    codes = y / scale.repeat_interleave(4, dim=1)
    assert torch.equal(codes, codes.round())
    stacked = torch.stack([w, w * 2])
    batched = torch.func.vmap(lambda t: fake_quant(t, scale, torch.zeros(4, 2), -8, 7, 1, 4, "identity"))(stacked)
    torch.testing.assert_close(batched[1], fake_quant(w * 2, scale, torch.zeros(4, 2), -8, 7, 1, 4, "identity"))


def test_ops_trace_with_torch_export():
    class M(torch.nn.Module):
        def forward(self, x):
            return fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7, -1, 0, "identity")

    ep = torch.export.export(M(), (torch.randn(3),))
    assert any("qzo.fake_quant" in str(n.target) for n in ep.graph.nodes)


def test_ops_trace_with_torch_compile():
    def f(x):
        return fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7, -1, 0, "identity") * 2

    x = torch.randn(16)
    compiled = torch.compile(f, backend="eager", fullgraph=True)  # dynamo traces through the fake kernel
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize("qmin, qmax, zero", [(0, 255, 37.0), (-128, 127, 0.0), (0, 15, 3.0)])
def test_kernel_is_the_same_batched_and_not(qmin, qmax, zero):
    # The kernel folds the zero point into the clamp outside vmap and adds it inside: same values.
    from qzo_fx.quant.ops import fake_quant_kernel

    x = torch.randn(3, 40) * 8
    x[:, :6] = (torch.arange(-3, 3) + 0.5) * 0.1  # exact ties
    scale, zero_point = torch.tensor(0.1), torch.tensor(zero)
    batched = torch.func.vmap(lambda t: fake_quant_kernel(t, scale, zero_point, qmin, qmax, -1, 0))(x)
    assert torch.equal(batched, fake_quant_kernel(x, scale, zero_point, qmin, qmax, -1, 0))
