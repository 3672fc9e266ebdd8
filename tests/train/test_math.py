"""The estimator math (qzo_fx.train.reference) against its expectations, and the STE smoothing table.

Monte Carlo tolerances are 5 standard errors computed from the samples themselves (CLT), so a
correct implementation fails with probability < 1e-5 per coordinate while a wrong formula (e.g. a
missing eps normalisation) misses by many standard errors.
"""
from __future__ import annotations

import math

import pytest
import torch

import qzo_fx
from qzo_fx.quant.ops import SIGN_SURROGATES
from qzo_fx.train import reference
from qzo_fx.train.estimators import beta_for_share
from qzo_fx.train.perturbed import EPS_BAR, NOISE_LAW


def _quadratic(d=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    a = m @ m.T + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    return theta, a @ theta + b, lambda values: 0.5 * values[0] @ a @ values[0] + values[0] @ b


@pytest.mark.parametrize("law", ["uniform", "logistic", "triangular", "gaussian"])
def test_noise_laws_have_mean_0_variance_1(law):
    u = reference.noise("torch", law, 1, torch.empty(400_000)).double()
    assert abs(u.mean()) < 5 * u.std() / math.sqrt(u.numel())
    assert abs(u.var() - 1) < 5 * (u.pow(2).std() / math.sqrt(u.numel()))


def test_fogzo_expectation_on_random_quadratic():
    """E[G] = beta (g/|g_z|) (g_hat . grad_z) + (1 - beta) grad, with a biased 'STE' gradient g."""
    torch.manual_seed(0)
    theta, grad, loss = _quadratic()
    d, beta, samples = theta.numel(), 0.9, 20_000
    eps = (0.05 + torch.rand(d, dtype=torch.float64)) * 0.1          # per-coordinate eps
    g = grad + 0.8 * grad.norm() / math.sqrt(d) * torch.randn(d, dtype=torch.float64)  # biased
    per_sample = torch.stack([reference.fogzo(loss, [theta], [g], [eps], ["uniform"], beta=beta, n=1,
                                              step_seed=seed, backend="torch")[0] for seed in range(samples)])
    g_z = eps * g
    g_hat = g_z / g_z.norm()
    expected = beta * (g / g_z.norm()) * (g_hat @ (eps * grad)) + (1 - beta) * grad
    err = (per_sample.mean(0) - expected).abs()
    stderr = per_sample.std(0) / math.sqrt(samples)
    assert (err < 5 * stderr).all(), (err / stderr).max()
    # n directions in one call are the mean of those directions' estimates.
    many = reference.fogzo(loss, [theta], [g], [eps], ["uniform"], beta=beta, n=8, step_seed=3, backend="torch")[0]
    assert torch.isfinite(many).all() and many.norm() > 0


def test_nspsa_gaussian_is_unbiased_for_the_smoothed_loss():
    """Stein: E[(L(x+eps z) - L(x-eps z)) / (2 eps) z] = grad E[L(x + eps z)] exactly.
    L = sum w sin(x) has smoothed gradient w cos(x) exp(-eps^2 / 2)."""
    d, eps, samples = 20, 0.7, 400
    w = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    x = torch.linspace(-2, 2, d, dtype=torch.float64)
    loss = lambda values: (w * torch.sin(values[0])).sum()
    estimate = reference.nspsa(loss, [x], [torch.tensor(eps, dtype=torch.float64)], ["gaussian"], n=samples,
                               step_seed=5, backend="torch")[0]
    per = [reference.nspsa(loss, [x], [torch.tensor(eps, dtype=torch.float64)], ["gaussian"], n=1, step_seed=s,
                           backend="torch")[0] for s in range(samples)]
    stderr = torch.stack(per).std(0) / math.sqrt(samples)
    expected = w * torch.cos(x) * math.exp(-eps**2 / 2)
    assert ((estimate - expected).abs() < 6 * stderr).all()


@pytest.mark.parametrize("ste,row", [("identity", "round"), ("hardtanh", "hardtanh"), ("tanh", "tanh"),
                                     ("approxsign", "approxsign")])
def test_eps_bar_and_noise_law_reproduce_each_surrogate(ste, row):
    """d/dx E[h(x + eps_bar u)] (Monte Carlo, common random numbers) equals the STE surrogate."""
    u = reference.noise("torch", NOISE_LAW[row], 11, torch.empty(2_000_000, dtype=torch.float64)) * EPS_BAR[row]
    h = torch.round if row == "round" else (lambda t: torch.where(t >= 0, 1.0, -1.0).double())
    xs = torch.tensor([-1.3, -0.7, -0.31, -0.05, 0.12, 0.45, 0.8, 1.6], dtype=torch.float64)
    delta = 0.02
    for x in xs:
        diff = (h(x + delta + u) - h(x - delta + u)) / (2 * delta)
        want = 1.0 if row == "round" else float(SIGN_SURROGATES[ste](torch.tensor(float(x))))
        # Finite-difference smoothing error is O(delta^2 * |h'''|) << tolerance here.
        tol = 5 * float(diff.std()) / math.sqrt(diff.numel()) + 2e-3
        assert abs(float(diff.mean()) - want) < tol, (float(x), float(diff.mean()), want)


def test_beta_one_estimate_is_parallel_to_the_ste_gradient():
    g = [torch.randn(5, 3), torch.randn(7)]
    theta = [torch.randn(5, 3), torch.randn(7)]
    eps = [torch.rand(5, 1) + 0.1, torch.tensor(0.3)]
    loss = lambda values: sum((v ** 3).sum() for v in values)
    G = reference.fogzo(loss, theta, g, eps, ["uniform", "uniform"], beta=1.0, n=1, step_seed=0)
    flat_g, flat_G = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in G])
    assert abs(abs(float(torch.nn.functional.cosine_similarity(flat_g, flat_G, dim=0))) - 1) < 1e-5


def test_zero_guide_keeps_the_ste_gradient():
    zero = [torch.zeros(4)]
    G = reference.fogzo(lambda v: v[0].sum(), [torch.ones(4)], zero, [torch.tensor(0.1)], ["uniform"], beta=0.9,
                        n=1, step_seed=0)
    assert torch.equal(G[0], zero[0])


def test_unit_norm_noise_is_smaller_than_per_coordinate():
    g, theta, eps = [torch.randn(4000)], [torch.zeros(4000)], [torch.tensor(0.1)]
    c = {}
    for form in ("per_coordinate", "unit_norm"):
        # The loss is linear in theta along a fixed w: G = (w . eps v) v / eps, so |G| tracks |v|^2.
        w = torch.ones(4000)
        G = reference.fogzo(lambda v, w=w: (w * v[0]).sum(), theta, g, eps, ["uniform"], beta=0.5, n=1,
                            step_seed=1, noise_form=form)
        c[form] = float(G[0].norm())
    assert c["per_coordinate"] > 20 * c["unit_norm"]


@pytest.mark.parametrize("share,dim", [(0.5, 1000), (0.1, 10**6), (0.9, 50)])
def test_guide_share_sets_the_guided_part_of_the_energy(share, dim):
    beta = beta_for_share(share, dim)
    assert beta / (beta + (1 - beta) * dim) == pytest.approx(share, rel=1e-9)
    assert beta_for_share(share, dim, "unit_norm") == share
    est = qzo_fx.FOGZO(guide_share=share, total_steps=10)
    assert est.beta(0, dim=dim) == 1.0 and est.beta(10, dim=dim) == pytest.approx(beta)
    with pytest.raises(qzo_fx.ConfigError, match="guide_share"):
        qzo_fx.FOGZO(guide_share=share, beta_min=0.99)


def test_guide_share_measured_on_directions():
    """The share of ||v||^2 on the guide, measured on drawn per-coordinate directions."""
    from qzo_fx.train.directions import Directions
    from qzo_fx.train.noise import Noise

    d, share = 20_000, 0.25
    beta = beta_for_share(share, d)
    g, eps = [torch.randn(d)], [torch.tensor(0.2)]
    shares = []
    for seed in range(20):
        v = Directions(seed, g, ["uniform"], 1, Noise("torch"), grads=g, eps=eps, beta=beta).tensor(0, 0)
        guided = math.sqrt(beta)  # the guided part has norm sqrt(beta) exactly
        shares.append(guided**2 / float(v.square().sum()))
    assert abs(sum(shares) / len(shares) - share) < 0.02
