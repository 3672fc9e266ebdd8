"""The estimators' math in plain torch, top to bottom: what every fast path must compute.

No graphs, strategies, workspaces or kernels: lists of tensors (one per perturbed parameter)
and ``loss_at(values)``, the mini-batch loss with ``values`` in place of the parameters (the
same batch and the same randomness at every call). Notation of docs/algorithms.md: ``eps =
step * eps_bar`` per coordinate, ``z = theta / eps``. Step ``t`` draws from ``seed + t``; the
streams (which key each ``u_ki`` comes from, chunked torch generators or the counter stream) are
defined in :mod:`qzo_fx.train.noise` and drawn here without its fast paths.

The tests run the training step (every strategy, the compiled kernels on and off) and these
functions on the same model and seed and compare the estimates (tests/train/test_reference.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from qzo_fx.train import counter
from qzo_fx.train.noise import CHUNK, UNIFORM_HALF_WIDTH, Noise, draw_chunk, noise_key, signs

__all__ = ["ste", "noise", "fogzo", "nspsa", "zo_sign", "zoqo"]

Tensors = list[Tensor]
LossAt = Callable[[Sequence[Tensor]], Tensor]


# ------------------------------------------------------------------------------------------ STE
def ste(loss: Tensor, params: Sequence[Tensor]) -> Tensors:
    """The STE gradient: autograd through the quantizers' surrogate derivatives."""
    return list(torch.autograd.grad(loss, list(params)))


# ---------------------------------------------------------------------------------------- noise
def noise(backend: str, law: str, key: int, like: Tensor, scale: float = 1.0) -> Tensor:
    """Stream ``key`` of ``law`` (mean 0, variance ``scale**2``), shaped like ``like``."""
    if Noise(backend).stream(law, like) == "compiled":
        return counter.uniform_levels(key, 0, like.numel(), UNIFORM_HALF_WIDTH * scale).view(like.shape)
    chunks = []
    for c in range(math.ceil(like.numel() / CHUNK)):
        generator = torch.Generator(device=like.device).manual_seed(counter.derive(key, c))
        size = min(CHUNK, like.numel() - c * CHUNK)
        chunks.append(draw_chunk(torch.empty(size, dtype=like.dtype, device=like.device), law, generator, scale))
    return torch.cat(chunks).view(like.shape) if chunks else torch.empty_like(like)


# ---------------------------------------------------------------------------------------- FOGZO
def fogzo(loss_at: LossAt, theta: Sequence[Tensor], grads: Sequence[Tensor], eps: Sequence[Tensor],
          laws: Sequence[str], *, beta: float, n: int, step_seed: int, two_sided: bool = True,
          base_loss: Optional[Tensor] = None, normalize: str = "global", noise_form: str = "per_coordinate",
          backend: str = "auto") -> Tensors:
    """FOGZO's estimate ``G`` (algorithms.md, "FOGZO step")."""
    # 1-2. The guide: g_z = eps * g and its unit vector (over the whole set, or per tensor).
    g_z = [e * g for e, g in zip(eps, grads)]
    norms = torch.stack([torch.linalg.vector_norm(t).float() for t in g_z])
    if normalize == "global":
        norms = norms.square().sum().sqrt().expand(len(g_z))
    if float(norms.square().sum()) == 0.0:
        return [g.clone() for g in grads]  # no direction to follow: the STE gradient (zero here)
    inverse = [1.0 / nrm if nrm > 0 else torch.zeros_like(nrm) for nrm in norms]
    a, b = math.sqrt(beta), math.sqrt(max(1.0 - beta, 0.0))
    G = [torch.zeros_like(t) for t in theta]
    for k, s in enumerate(signs(step_seed, n)):
        # 3. v_k = sqrt(beta) s_k g_hat + sqrt(1 - beta) u_k, with g_hat = g_z / ||g_z||.
        u = [noise(backend, law, noise_key(step_seed, k, i), t, b if noise_form == "per_coordinate" else 1.0)
             for i, (law, t) in enumerate(zip(laws, theta))]
        if noise_form == "unit_norm":
            norm_u = torch.sqrt(sum(t.float().square().sum() for t in u))
            u = [t * (b / norm_u).to(t.dtype) for t in u]
        coefficient = [inv * (a * s) for inv in inverse]  # a s / ||g_z||
        v = [torch.addcmul(ui, g, e * ci.to(g.dtype)) for ui, g, e, ci in zip(u, grads, eps, coefficient)]
        # 4. c_k: finite differences of the real quantized loss along eps * v_k.
        plus = loss_at([torch.addcmul(t, vi, e) for t, vi, e in zip(theta, v, eps)])
        if two_sided:
            c = (plus - loss_at([torch.addcmul(t, vi, e, value=-1.0) for t, vi, e in zip(theta, v, eps)])) / 2
        else:
            c = plus - base_loss
        # 5. G = (1/n) sum_k c_k v_k / eps.
        G = [acc + c * vi / e for acc, vi, e in zip(G, v, eps)]
    return [acc / n for acc in G]


# --------------------------------------------------------------------------- n-SPSA and ZO-sign
def _spsa_terms(loss_at: LossAt, theta, eps, laws, n: int, step_seed: int, backend: str):
    """``(c_k, u_k)`` of n two-sided finite differences along ``eps * u_k``."""
    for k in range(n):
        u = [noise(backend, law, noise_key(step_seed, k, i), t) for i, (law, t) in enumerate(zip(laws, theta))]
        plus = loss_at([torch.addcmul(t, ui, e) for t, ui, e in zip(theta, u, eps)])
        minus = loss_at([torch.addcmul(t, ui, e, value=-1.0) for t, ui, e in zip(theta, u, eps)])
        yield (plus - minus) / 2, u


def nspsa(loss_at: LossAt, theta: Sequence[Tensor], eps: Sequence[Tensor], laws: Sequence[str], *, n: int,
          step_seed: int, backend: str = "auto") -> Tensors:
    """n-SPSA: ``G = (1/n) sum_k c_k u_k / eps``."""
    G = [torch.zeros_like(t) for t in theta]
    for c, u in _spsa_terms(loss_at, theta, eps, laws, n, step_seed, backend):
        G = [acc + c * ui / e for acc, ui, e in zip(G, u, eps)]
    return [acc / n for acc in G]


def zo_sign(loss_at: LossAt, theta: Sequence[Tensor], eps: Sequence[Tensor], laws: Sequence[str], *, n: int,
            step_seed: int, variant: str = "elementwise", backend: str = "auto") -> Tensors:
    """ZO-SignSGD (``sign`` of the n-SPSA estimate) or ZO-Bench's "ZO-SGD-Sign" (``mean sign(c_k) u_k``)."""
    if variant == "elementwise":
        return [torch.sign(g) for g in nspsa(loss_at, theta, eps, laws, n=n, step_seed=step_seed, backend=backend)]
    G = [torch.zeros_like(t) for t in theta]
    for c, u in _spsa_terms(loss_at, theta, eps, laws, n, step_seed, backend):
        G = [acc + torch.sign(c) * ui for acc, ui in zip(G, u)]
    return [acc / n for acc in G]


# ----------------------------------------------------------------------------------------- ZOQO
def zoqo_noise(backend: str, key: int, radius: Tensor, like: Tensor, law: str) -> Tensor:
    """Integer noise ``j`` in ``{-m..m}``: gaussian ``round(N(0,1) m / 2)`` clipped to ``+-m``, or
    each integer alike (``floor(p (2m + 1)) - m``, p uniform on (0, 1))."""
    m = radius.to(torch.float32)
    template = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if law == "gaussian":
        j = noise(backend, "gaussian", key, template).mul_(m / 2).round_()
        j = torch.maximum(torch.minimum(j, m), -m)
    else:
        p = noise(backend, "uniform", key, template).div_(2 * UNIFORM_HALF_WIDTH).add_(0.5)
        j = torch.floor(p * (2 * m + 1)) - m
    return j.to(like.dtype)


def zoqo(loss_at: LossAt, codes: Sequence[Tensor], steps: Sequence[Tensor], qranges: Sequence[tuple[int, int]], *,
         lr: float, mu: float, law: str, step_seed: int, backend: str = "auto") -> Tensors:
    """One ZOQO step on integer codes: the new codes (they never leave ``[qmin, qmax]``)."""
    noise_j = [zoqo_noise(backend, noise_key(step_seed, 0, i), torch.clamp_min(torch.floor(mu / s), 1), k, law)
               for i, (k, s) in enumerate(zip(codes, steps))]
    plus = loss_at([(k + j).clamp(lo, hi) for k, j, (lo, hi) in zip(codes, noise_j, qranges)])
    minus = loss_at([(k - j).clamp(lo, hi) for k, j, (lo, hi) in zip(codes, noise_j, qranges)])
    direction = torch.sign(plus - minus)
    out = []
    for k, j, s, (lo, hi) in zip(codes, noise_j, steps, qranges):
        moves = torch.clamp_min(torch.floor(lr / s), 1)
        out.append((k - (moves * direction * torch.sign(j)).to(k.dtype)).clamp(lo, hi))
    return out
