"""The directions of one zeroth-order step and the estimate built from them (the fast path of
:mod:`qzo_fx.train.reference`).

``v_k = sqrt(beta) s_k g_hat + sqrt(1 - beta) u_k`` in z-space (``g_hat`` the unit vector of
``eps * g``; n-SPSA: ``v_k = u_k``), and ``G = (1/n) sum_k c_k v_k / eps``. Every scalar that
depends on tensor values (the guide norm, the losses) stays a device tensor, so nothing here
waits for the device. Each ``v_ki`` is reproducible on its own from tensor i's stream, so the
directions can be materialized for all tensors at once or regenerated one tensor at a time (the
lean strategy) with identical values. A rank of a sharded model (:mod:`qzo_fx.train.sharding`)
holds a slice of each tensor: ``offsets`` place it in the tensor's stream and ``sum_over_shards``
makes the norms those of the whole set, so every rank builds its rows of the same directions.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from qzo_fx.train.noise import Noise, noise_key, signs
from qzo_fx.train.workspace import Workspace

__all__ = ["Directions", "scaled_norm"]

Tensors = list[Tensor]


def scaled_norm(g: Tensor, e: Tensor) -> Tensor:
    """``||e * g||`` for ``e`` broadcasting against ``g``, without the product where ``e`` is
    constant along dimensions (per-tensor or per-channel scales): ``||e * ||g||_those dims||``.

    Accumulated in float64: a float32 sum of squares overflows once entries reach about 1e19, a
    finite STE gradient that a random-init network reaches on a small batch (BatchNorm over two
    samples), and an infinite norm would read as a non-finite gradient and drop the guide."""
    wide = torch.float32 if g.device.type == "mps" else torch.float64  # MPS has no float64
    if e.numel() == 1:
        return torch.linalg.vector_norm(g, dtype=wide) * e.reshape(()).abs()
    shape = (1,) * (g.dim() - e.dim()) + tuple(e.shape)
    constant = tuple(d for d, (es, gs) in enumerate(zip(shape, g.shape)) if es == 1 and gs > 1)
    if len(shape) != g.dim() or not constant:
        return torch.linalg.vector_norm(torch.mul(g, e), dtype=wide)
    rows = torch.linalg.vector_norm(g, dim=constant, keepdim=True, dtype=wide)
    return torch.linalg.vector_norm(rows.mul_(e.reshape(shape)))


class Directions:
    """The n directions of one step as a function ``tensor(k, i)``.

    Args:
        step_seed: the step's seed (base seed + step index).
        like: the perturbed tensors (shapes, devices, dtypes of the directions).
        laws: each tensor's noise law.
        n: directions.
        noise: where the noise is drawn (:class:`~qzo_fx.train.noise.Noise`).
        grads, eps, beta, normalize, noise_form: FOGZO's guide; ``grads=None`` gives ``v = u``.
        offsets: ``(start, total)`` of each tensor in its stream (a shard); None: whole tensors.
        sum_over_shards: per-tensor values (``[tensors]``) summed over the ranks holding the
            other shards; None: nothing is sharded.
    """

    def __init__(self, step_seed: int, like: Sequence[Tensor], laws: Sequence[str], n: int, noise: Noise, *,
                 grads: Optional[Sequence[Tensor]] = None, eps: Optional[Sequence[Tensor]] = None,
                 beta: float = 0.0, normalize: str = "global", noise_form: str = "per_coordinate",
                 offsets: Optional[Sequence[tuple[int, int]]] = None,
                 sum_over_shards: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.step_seed, self.like, self.laws, self.n, self.noise = step_seed, list(like), list(laws), n, noise
        self.offsets = list(offsets) if offsets is not None else [(0, t.numel()) for t in self.like]
        self._sum = sum_over_shards
        self.grads, self.eps = (None if grads is None else list(grads)), (None if eps is None else list(eps))
        self.a = math.sqrt(beta) if grads is not None else 0.0
        self.b = math.sqrt(max(1.0 - beta, 0.0)) if grads is not None else 1.0
        self.signs = signs(step_seed, n)
        self.guide_norms: Optional[Tensor] = None  # per tensor, ||eps_i * g_i|| (device)
        self._coefficients: Optional[Tensor] = None  # [n, tensors]: a s_k / ||g_z||, 0 for a zero guide
        if self.a > 0:
            self.guide_norms = torch.stack([scaled_norm(g, e) for g, e in zip(self.grads, self.eps)])  # float64
            if self._sum is not None:  # the norms of the whole tensors, from every rank's rows
                self.guide_norms = self._sum(self.guide_norms.square()).sqrt()
            norms = self.guide_norms if normalize == "per_tensor" else self.guide_norms.square().sum().sqrt().expand(
                len(self.like))
            # A zero guide (every eps * g exactly 0) has no direction: its part is dropped
            # (the step then writes the STE gradient, zero there; see the estimators).
            inverse = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            self._coefficients = torch.stack([inverse * (self.a * s) for s in self.signs]).float()  # no host copy
        self._noise_scale: Optional[list[Tensor]] = None  # unit-norm noise: b / ||u_k|| (device)
        if noise_form == "unit_norm" and self.b > 0:
            self._noise_scale = [self.b / self._noise_norm(k) for k in range(n)]

    @property
    def zero_guide(self) -> Optional[Tensor]:
        """A device flag: the guide is zero (FOGZO then keeps the STE gradient); None without a guide."""
        return None if self.guide_norms is None else (self.guide_norms.square().sum() == 0)

    def _noise_norm(self, k: int) -> Tensor:
        if self._sum is not None:
            squares = torch.stack([self._raw(k, i, torch.empty_like(t), 1.0).float().square().sum()
                                   for i, t in enumerate(self.like)])
            return torch.sqrt(self._sum(squares).sum())
        total = sum(self._raw(k, i, torch.empty_like(t), 1.0).float().square().sum() for i, t in enumerate(self.like))
        return torch.sqrt(total)

    def _raw(self, k: int, i: int, out: Tensor, scale: float) -> Tensor:
        start, total = self.offsets[i]
        return self.noise.fill(out, self.laws[i], noise_key(self.step_seed, k, i), scale, start=start, total=total)

    def tensor(self, k: int, i: int, out: Optional[Tensor] = None) -> Tensor:
        """``v_k`` on tensor i (into ``out`` when given)."""
        out = torch.empty_like(self.like[i]) if out is None else out
        if self.b == 0:
            out.zero_()
        elif self._noise_scale is None:
            self._raw(k, i, out, self.b)
        else:
            self._raw(k, i, out, 1.0).mul_(self._noise_scale[k].to(out.dtype))
        if self._coefficients is not None:
            out.addcmul_(self.grads[i], self.eps[i] * self._coefficients[k, i].to(out.dtype))
        return out

    def materialize(self, workspace: Workspace) -> list[Tensors]:
        """All n directions on all tensors, in workspace buffers reused from step to step."""
        return [[self.tensor(k, i, buf) for i, buf in enumerate(workspace.like(("v", k), self.like))]
                for k in range(self.n)]

    def write_estimate(self, out: Tensors, coefficients: Tensor, directions: Optional[list[Tensors]] = None,
                       divide_by_eps: bool = True) -> None:
        """``out_i = (1/n) sum_k c_k v_ki / eps_i`` (``c`` a device tensor of n values), one pass
        per direction: the weights ``c_k / (n eps_i)`` are eps-sized. ``directions``: the
        materialized ones, else each ``v_ki`` is regenerated (the lean strategy)."""
        weights = coefficients.to(torch.float32) / self.n
        for i, target in enumerate(out):
            scale = (1.0 / self.eps[i]) if divide_by_eps else torch.ones((), device=target.device)
            # Regenerated directions read the STE gradient (which ``out`` may be): sum apart first.
            acc = target if directions is not None else torch.empty_like(target)
            for k in range(self.n):
                v = directions[k][i] if directions is not None else self.tensor(k, i)
                w = (weights[k].to(target.dtype) * scale).to(target.dtype)
                if k == 0:
                    torch.mul(v, w, out=acc)
                else:
                    acc.addcmul_(v, w)
            if acc is not target:
                target.copy_(acc)
