"""The estimator math in plain tensors: expectations, the STE smoothing table, reproducibility.

Monte Carlo tolerances are 5 standard errors computed from the samples themselves (CLT), so a
correct implementation fails with probability < 1e-5 per coordinate while a wrong formula (e.g. a
missing eps normalisation) misses by many standard errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qzo_fx.quant.ops import SIGN_SURROGATES
from qzo_fx.train.zo_math import EPS_BAR, NOISE_LAW, NoiseStream, combine, fogzo_directions


def _quadratic(d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    a = m @ m.T + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    loss = lambda t: 0.5 * (t * (t @ a)).sum(-1) + t @ b  # batched over leading dims
    return theta, a @ theta + b, loss


@pytest.mark.parametrize("law", ["uniform", "logistic", "triangular", "gaussian"])
def test_noise_laws_have_mean_0_variance_1(law):
    u = NoiseStream(1).sample(law, (400_000,)).double()
    se = 5 / math.sqrt(u.numel())
    assert abs(u.mean()) < se * u.std()
    assert abs(u.var() - 1) < 5 * (u.pow(2).std() / math.sqrt(u.numel()))


def test_fogzo_expectation_on_random_quadratic():
    """E[G] = beta (g/|g_z|) (g_hat . grad_z) + (1 - beta) grad, with a biased 'STE' gradient g."""
    torch.manual_seed(0)
    theta, grad, loss = _quadratic()
    d, beta, samples = theta.numel(), 0.9, 100_000
    eps = (0.05 + torch.rand(d, dtype=torch.float64)) * 0.1          # per-coordinate eps
    g = grad + 0.8 * grad.norm() / math.sqrt(d) * torch.randn(d, dtype=torch.float64)  # biased
    directions = fogzo_directions([g], [eps], ["uniform"], beta, samples, 3)
    v = torch.stack([dirs[0] for dirs in directions])                 # [N, d], z-space
    c = (loss(theta + eps * v) - loss(theta - eps * v)) / 2           # exact first order here
    per_sample = c[:, None] * v / eps                                 # G of each direction
    g_z = eps * g
    g_hat = g_z / g_z.norm()
    expected = beta * (g / g_z.norm()) * (g_hat @ (eps * grad)) + (1 - beta) * grad
    err = (per_sample.mean(0) - expected).abs()
    stderr = per_sample.std(0) / math.sqrt(samples)
    assert (err < 5 * stderr).all(), (err / stderr).max()
    # combine() is the same average.
    torch.testing.assert_close(combine(c[:1000].tolist(), directions[:1000], [eps])[0], per_sample[:1000].mean(0))


def test_nspsa_gaussian_is_unbiased_for_the_smoothed_loss():
    """Stein: E[(L(x+eps z) - L(x-eps z)) / (2 eps) z] = grad E[L(x + eps z)] exactly.
    L = sum w sin(x) has smoothed gradient w cos(x) exp(-eps^2 / 2)."""
    d, eps, samples = 20, 0.7, 400_000
    w = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    x = torch.linspace(-2, 2, d, dtype=torch.float64)
    z = NoiseStream(5).sample("gaussian", (samples, d)).double()
    loss = lambda t: (w * torch.sin(t)).sum(-1)
    per_sample = ((loss(x + eps * z) - loss(x - eps * z)) / (2 * eps))[:, None] * z
    expected = w * torch.cos(x) * math.exp(-eps**2 / 2)
    stderr = per_sample.std(0) / math.sqrt(samples)
    assert ((per_sample.mean(0) - expected).abs() < 5 * stderr).all()


@pytest.mark.parametrize("ste,row", [("identity", "round"), ("hardtanh", "hardtanh"), ("tanh", "tanh"),
                                     ("approxsign", "approxsign")])
def test_eps_bar_and_noise_law_reproduce_each_surrogate(ste, row):
    """d/dx E[h(x + eps_bar u)] (Monte Carlo, common random numbers) equals the STE surrogate."""
    u = NoiseStream(11).sample(NOISE_LAW[row], (2_000_000,)).double() * EPS_BAR[row]
    h = torch.round if row == "round" else (lambda t: torch.where(t >= 0, 1.0, -1.0).double())
    xs = torch.tensor([-1.3, -0.7, -0.31, -0.05, 0.12, 0.45, 0.8, 1.6], dtype=torch.float64)
    delta = 0.02
    for x in xs:
        diff = (h(x + delta + u) - h(x - delta + u)) / (2 * delta)
        want = 1.0 if row == "round" else float(SIGN_SURROGATES[ste](torch.tensor(float(x))))
        # Finite-difference smoothing error is O(delta^2 * |h'''|) << tolerance here.
        tol = 5 * float(diff.std()) / math.sqrt(diff.numel()) + 2e-3
        assert abs(float(diff.mean()) - want) < tol, (float(x), float(diff.mean()), want)


def test_beta_one_direction_is_parallel_to_the_ste_gradient():
    g = [torch.randn(5, 3), torch.randn(7)]
    eps = [torch.rand(5, 1) + 0.1, torch.tensor(0.3)]
    v = fogzo_directions(g, eps, ["uniform", "uniform"], 1.0, 1, 0)[0]
    G = combine([0.37], [v], eps)
    flat_g, flat_G = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in G])
    cosine = torch.nn.functional.cosine_similarity(flat_g, flat_G, dim=0)
    assert abs(abs(float(cosine)) - 1) < 1e-6


def test_zero_gradient_gives_no_direction():
    assert fogzo_directions([torch.zeros(4)], [torch.tensor(0.1)], ["uniform"], 0.9, 1, 0) is None


def test_same_seed_same_noise_and_unit_norm_option():
    a = NoiseStream(42).sample("triangular", (1000,))
    b = NoiseStream(42).sample("triangular", (1000,))
    assert torch.equal(a, b)
    g, eps = [torch.randn(4000)], [torch.tensor(0.1)]
    per_coord = fogzo_directions(g, eps, ["uniform"], 0.5, 1, 1, noise="per_coordinate")[0][0]
    unit = fogzo_directions(g, eps, ["uniform"], 0.5, 1, 1, noise="unit_norm")[0][0]
    # sqrt(1 - beta) |u| is ~sqrt(d/2) per coordinate, sqrt(1/2) with unit-norm noise.
    assert per_coord.norm() > 20 * unit.norm() / 2
    assert np.isclose(float(unit.norm()), 1.0, atol=0.3)


def test_direction_signs_and_noise_are_independent_streams():
    """Regression: SeedSequence zero-pads entropy, so untagged (seed, k) and (seed, k, 0) collide."""
    from qzo_fx.train.zo_math import Directions

    g = [torch.randn(3, dtype=torch.float64)]
    d = Directions(5, g, ["uniform"], 4000, grads=g, eps=[torch.ones(3, dtype=torch.float64)], beta=0.5)
    signs = torch.tensor(d.signs, dtype=torch.float64)
    first_noise = torch.stack([d._noise(k, 0)[0] for k in range(4000)])
    assert abs(float((signs * first_noise).mean())) < 5 / math.sqrt(4000)


@pytest.mark.parametrize("beta", [0.0, 0.9, 1.0])
def test_materialized_directions_equal_each_tensor_streamed_alone(beta):
    # materialize() draws all tensors into one buffer and adds the guide in one foreach call;
    # the lean strategy regenerates tensor by tensor: the values must be the same bits.
    from qzo_fx.train.workspace import Workspace
    from qzo_fx.train.zo_math import Directions

    g = torch.Generator().manual_seed(0)
    like = [torch.randn(64, 32, generator=g), torch.randn(10, generator=g), torch.randn(5, 3, 3, 3, generator=g)]
    grads = [torch.randn(t.shape, generator=g) for t in like]
    eps = [torch.rand(64, 1, generator=g), torch.tensor(0.2), torch.rand(5, 1, 1, 1, generator=g)]
    directions = Directions(7, like, ["uniform"] * 3, 2, grads=grads, eps=eps, beta=beta)
    for k, tensors in enumerate(directions.materialize(Workspace())):
        for i, v in enumerate(tensors):
            assert torch.equal(v, directions.tensor(k, i))
