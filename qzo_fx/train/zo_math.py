"""Zeroth-order numerics as plain tensor functions (no graphs, no modules).

Everything works on lists of tensors, one per perturbed parameter, in the parameter's shape.
Notation follows algorithms.md: eps = scale * eps_bar per coordinate, z = theta / eps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from qzo_fx.train.counter_noise import HALF_LEVELS as _HALF_LEVELS, fill_uniform, step_words
from qzo_fx.train.workspace import Workspace

__all__ = ["EPS_BAR", "NOISE_LAW", "smoothing_of", "NoiseStream", "Directions", "fogzo_directions", "combine",
           "Tensors"]

Tensors = list[Tensor]

# eps_bar and unit-variance noise law of each STE: the STE is the exact gradient of the
# quantizer smoothed by eps_bar * u, u ~ law (units of one quantization step).
EPS_BAR = {
    "round": 1.0 / (2.0 * math.sqrt(3.0)),
    "hardtanh": 1.0 / math.sqrt(3.0),
    "tanh": math.pi / math.sqrt(12.0),
    "approxsign": 1.0 / math.sqrt(6.0),
}
NOISE_LAW = {"round": "uniform", "hardtanh": "uniform", "tanh": "logistic", "approxsign": "triangular"}


def smoothing_of(ste: str, bits: int) -> str:
    """Which row of the STE table a quantizer uses: ``round`` for b >= 2, else its sign surrogate."""
    if bits >= 2:
        return "round"
    # Identity, clipped and LSQ on sign() all pass the gradient within one step: hardtanh's row.
    return ste if ste in ("tanh", "approxsign") else "hardtanh"


UNIFORM_HALF_WIDTH = math.sqrt(3.0)  # uniform on (-sqrt 3, sqrt 3): unit variance


def uniform_levels(out: Tensor, raw: np.ndarray, half_width: float) -> Tensor:
    """``out`` <- the raw 16-bit integers as centred levels on (-half_width, half_width):
    ``(raw + 0.5) * half_width / 32768`` (mean exactly 0)."""
    return out.copy_(torch.from_numpy(raw)).add_(0.5).mul_(half_width / _HALF_LEVELS)


class NoiseStream:
    """Seeded source of perturbation noise.

    Uniform-based laws are built from 16-bit integers cut from SFC64 raw output: on CPU that is
    ~4x faster than torch's generator, and noise sampling is a large share of a ZO step. The
    65,536 levels are centred (mean exactly 0) and rescaled to unit variance. The same seed
    gives the same stream on every machine, which distributed ranks rely on.
    """

    def __init__(self, seed: Union[int, Sequence[int]]) -> None:
        # A sequence seeds an independent stream, e.g. (step seed, direction, tensor index).
        entropy = np.random.SeedSequence(list(seed)) if isinstance(seed, (tuple, list)) else seed
        self._bits = np.random.SFC64(entropy)
        self._generator: Optional[np.random.Generator] = None  # built only for sign / gaussian

    @property
    def _rng(self) -> np.random.Generator:
        if self._generator is None:
            self._generator = np.random.Generator(self._bits)
        return self._generator

    def sign(self) -> float:
        return 1.0 if self._rng.random() < 0.5 else -1.0

    def raw_levels(self, count: int) -> np.ndarray:
        """``count`` raw 16-bit integers (each 64-bit word gives four)."""
        return self._bits.random_raw((count + 3) // 4).view(np.int16)[:count]

    def _levels(self, out: Tensor, scale: float, accumulate: bool = False) -> Tensor:
        """Fill (or add to) flat ``out`` with i.i.d. values uniform on the 65,536 centred levels
        of (-scale, scale)."""
        raw = self.raw_levels(out.numel())
        if accumulate:
            return out.add_(torch.from_numpy(raw).to(out.dtype).add_(0.5), alpha=scale / _HALF_LEVELS)
        return uniform_levels(out, raw, scale)

    def fill(self, law: str, out: Tensor, scale: float = 1.0) -> Tensor:
        """Fill the flat CPU tensor ``out`` with i.i.d. noise of mean 0 and variance ``scale**2``
        from ``law`` (the scale folded into the last pass rather than one more pass over ``out``)."""
        if law == "uniform":
            return self._levels(out, UNIFORM_HALF_WIDTH * scale)
        if law == "triangular":
            # The sum of two uniforms on (-a/2, a/2) is triangular on (-a, a), variance a^2/6.
            self._levels(out, math.sqrt(6.0) / 2.0 * scale)
            return self._levels(out, math.sqrt(6.0) / 2.0 * scale, accumulate=True)
        if law == "logistic":
            # Logistic(0, s) has variance s^2 pi^2 / 3; s = sqrt(3) / pi gives unit variance.
            p = self._levels(out, 1.0).add_(1.0).mul_(0.5)
            return p.div_(1.0 - p).log_().mul_(math.sqrt(3.0) / math.pi * scale)
        if law == "gaussian":
            out.copy_(torch.from_numpy(self._rng.standard_normal(out.numel(), dtype=np.float32)))
            return out if scale == 1.0 else out.mul_(scale)
        raise ValueError(f"unknown noise law {law!r}")

    def sample(self, law: str, shape: Sequence[int], dtype=torch.float32, device=None) -> Tensor:
        """A fresh tensor of i.i.d. noise of mean 0 and variance 1 from ``law``."""
        out = self.fill(law, torch.empty(math.prod(shape), dtype=torch.float32))
        return out.reshape(shape).to(dtype=dtype, device=device)


# Stream tags: the step's words (signs, keys) and the per-tensor streams of the other laws. numpy's
# SeedSequence zero-pads its entropy, so (seed, k) and (seed, k, 0) would be the same stream:
# every stream carries a non-zero tag of its own.
_DIRECTION_TAG, _NOISE_TAG = 1, 2


class Directions:
    """The n perturbation directions of one step as a *function*: ``tensor(k, i)`` computes
    ``v_k`` on tensor i alone (its slice of direction k's stream, or its own stream).

    FOGZO: ``v_k = sqrt(beta) s_k g_hat + sqrt(1 - beta) u_k`` with ``g_hat`` the unit vector of
    ``eps * g`` (globally or per tensor); n-SPSA: ``v_k = u_k`` (``grads=None``). Because every
    tensor is reproducible on its own, directions can be materialized for all tensors at once or
    streamed one tensor at a time (memory about the largest tensor), with identical values.
    """

    def __init__(self, seed: int, like: Tensors, laws: Sequence[str], n: int, *, grads: Optional[Tensors] = None,
                 eps: Optional[Tensors] = None, beta: float = 0.0, normalize: str = "global",
                 noise: str = "per_coordinate") -> None:
        self.seed, self.like, self.laws, self.n = seed, list(like), list(laws), n
        # Uniform noise everywhere: one counter-based stream per direction over the concatenated
        # parameters, tensor i at offset starts[i], so any tensor alone (lean strategy) or all at
        # once (materialize) is one fill of its own length; other laws draw one stream per tensor.
        self._shared = all(law == "uniform" for law in self.laws)
        self._starts = [0]
        for t in self.like[:-1]:
            self._starts.append(self._starts[-1] + t.numel())
        self.grads, self.eps = grads, eps
        self.a = math.sqrt(beta) if grads is not None else 0.0
        self.b = math.sqrt(max(1.0 - beta, 0.0)) if grads is not None else 1.0
        # The step's signs and the directions' stream keys from one short integer stream: it runs
        # right after the base pass, when every extra object touched is a cache miss.
        words = step_words(seed, _DIRECTION_TAG, 2 * n)
        self.signs = [1.0 if w & 1 else -1.0 for w in words[:n]]
        self._keys = words[n:]
        self.guide_norms: Optional[list[float]] = None
        if self.a > 0:
            self.guide_norms = _checked_norms(_guide_norms(grads, eps), per_tensor=normalize == "per_tensor")
        self.noise_scale = [1.0] * n
        if noise == "unit_norm" and self.b > 0:
            for k in range(n):
                norm = _norms_of(lambda i: self._noise(k, i), len(self.like), per_tensor=False)
                self.noise_scale[k] = 1.0 / norm[0] if norm else 1.0

    @property
    def valid(self) -> bool:
        """False when the guide (eps * g) is zero: the caller keeps the STE gradient."""
        return self.a == 0.0 or self.guide_norms is not None

    def _noise(self, k: int, i: int, out: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
        like = self.like[i]
        target = out if out is not None else torch.empty_like(like)
        # Drawn straight into a contiguous float32 CPU target; elsewhere (GPU, other dtypes) via a
        # host buffer and one copy.
        direct = target.device.type == "cpu" and target.dtype == torch.float32 and target.is_contiguous()
        flat = target.view(-1) if direct else torch.empty(like.numel())
        if self._shared:
            fill_uniform(flat, self._keys[k], self._starts[i], UNIFORM_HALF_WIDTH * scale)
        else:
            NoiseStream((self.seed, _NOISE_TAG, k, i)).fill(self.laws[i], flat, scale)
        return target if direct else target.copy_(flat.view(like.shape))

    def tensor(self, k: int, i: int, out: Optional[Tensor] = None) -> Tensor:
        """``v_k`` on tensor i (into ``out`` when given)."""
        if self.b > 0:
            v = self._noise(k, i, out, scale=self.b * self.noise_scale[k])
        else:
            v = (out if out is not None else torch.empty_like(self.like[i])).zero_()
        if self.a > 0:
            v.addcmul_(self.grads[i], self.eps[i], value=self.a * self.signs[k] / self.guide_norms[i])
        return v

    def materialize(self, workspace: Optional[Workspace] = None) -> list[Tensors]:
        """All n directions on all tensors (views of workspace buffers when one is given)."""
        workspace = Workspace.get(workspace)
        if not self._fusable():
            return [[self.tensor(k, i, buf) for i, buf in enumerate(workspace.like(("v", k), self.like))]
                    for k in range(self.n)]
        # The values of tensor(k, i) for every i, but direction k lives in one flat buffer: one
        # draw from its stream, one conversion pass and one foreach call for all tensors instead
        # of a handful of small ops per tensor (which dominate on many small tensors).
        out = []
        for k in range(self.n):
            flat, views = workspace.flat_like(("v", k), self.like)
            if self.b > 0:
                fill_uniform(flat, self._keys[k], 0, UNIFORM_HALF_WIDTH * (self.b * self.noise_scale[k]))
            else:
                flat.zero_()
            if self.a > 0:
                torch._foreach_addcmul_(views, list(self.grads), list(self.eps),
                                        [self.a * self.signs[k] / norm for norm in self.guide_norms])
            out.append(views)
        return out

    def _fusable(self) -> bool:
        """All tensors float32 on CPU with uniform noise: the flat, foreach path of materialize."""
        return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in self.like)
                and (self.b == 0 or self._shared))

    def estimate(self, i: int, coefficients: Sequence[float], eps: Tensor) -> Tensor:
        """``G_i = (1/n) sum_k c_k v_ki / eps_i`` for one tensor, regenerating each ``v_ki``."""
        acc = self.tensor(0, i).mul_(float(coefficients[0]) / self.n)
        for k in range(1, self.n):
            acc.add_(self.tensor(k, i), alpha=float(coefficients[k]) / self.n)
        return acc.div_(eps)


_LARGE = 1 << 16  # elements: above, a product tensor costs more (fresh pages, traffic) than 3 ops


def _guide_norms(grads: Tensors, eps: Tensors) -> list[float]:
    """``||eps_i * g_i||`` per tensor with one sync, never forming the product. Scalar eps
    (per-tensor scales) factor out: one foreach reduction. Eps constant along some dimensions
    (per-channel scales) factor out of those: ``||e * g|| = ||e * ||g||_rows||``, one reduction
    of g and a product of eps's size. Only eps of g's own shape needs the product, one tensor
    at a time (the lean strategy's memory bound)."""
    if all(e.numel() == 1 for e in eps):
        norms = torch.stack(torch._foreach_norm(list(grads)))
        return norms.mul_(torch.stack([e.reshape(()) for e in eps]).abs()).float().tolist()
    # Small tensors: per-op overhead dominates, so their products go through two foreach calls.
    # Large ones: memory traffic dominates, so no product is formed.
    small = [i for i, g in enumerate(grads) if g.numel() < _LARGE]
    norms: list[Optional[Tensor]] = [None] * len(grads)
    if small:
        products = torch._foreach_mul([grads[i] for i in small], [eps[i] for i in small])
        for i, norm in zip(small, torch._foreach_norm(products)):
            norms[i] = norm
    for i, g in enumerate(grads):
        if norms[i] is None:
            norms[i] = _scaled_norm(g, eps[i])
    return torch.stack(norms).float().tolist()


def _scaled_norm(g: Tensor, e: Tensor) -> Tensor:
    """``||e * g||`` for ``e`` broadcasting against ``g``."""
    if e.numel() == 1:
        return torch.linalg.vector_norm(g) * e.reshape(()).abs()
    shape = (1,) * (g.dim() - e.dim()) + tuple(e.shape)
    constant = tuple(d for d, (es, gs) in enumerate(zip(shape, g.shape)) if es == 1 and gs > 1)
    if len(shape) != g.dim() or not constant:
        return torch.linalg.vector_norm(torch.mul(g, e))
    rows = torch.linalg.vector_norm(g, dim=constant, keepdim=True)
    return torch.linalg.vector_norm(rows.mul_(e.reshape(shape)))


def _norms_of(make, count: int, per_tensor: bool) -> Optional[list[float]]:
    """Norms of ``make(i)`` for i < count, built one tensor at a time; None if any is 0."""
    return _checked_norms([float(make(i).norm()) for i in range(count)], per_tensor)


def _checked_norms(values: list[float], per_tensor: bool) -> Optional[list[float]]:
    """Per-tensor norms, or the global norm repeated; None if any is 0 or not finite."""
    count = len(values)
    if not per_tensor:
        values = [math.sqrt(sum(v * v for v in values))] * count
    return None if any(v == 0.0 or not math.isfinite(v) for v in values) else values


def fogzo_directions(grads: Tensors, eps: Tensors, laws: Sequence[str], beta: float, n: int,
                     seed: int, normalize: str = "global", noise: str = "per_coordinate",
                     workspace: Optional[Workspace] = None) -> Optional[list[Tensors]]:
    """The n FOGZO directions, materialized (see :class:`Directions`); None for a zero guide."""
    directions = Directions(seed, grads, laws, n, grads=grads, eps=eps, beta=beta, normalize=normalize, noise=noise)
    return directions.materialize(workspace) if directions.valid else None


def combine(coefficients: Sequence[float], directions: Sequence[Tensors], eps: Tensors,
            out: Optional[Tensors] = None) -> Tensors:
    """``G_j = (1/n) sum_i c_i v_ij / eps_j``: back from z-space to parameter units (into ``out``
    when given, e.g. the parameters' ``.grad``)."""
    n = len(directions)
    out = list(out) if out is not None else [torch.empty_like(v) for v in directions[0]]
    # Whole parameter lists per call: per-tensor op overhead dominates on many small tensors.
    torch._foreach_zero_(out)
    for c, v in zip(coefficients, directions):
        torch._foreach_addcdiv_(out, list(v), list(eps), value=float(c) / n)
    return out


def zoqo_noise(stream: NoiseStream, radius: Tensor, like: Tensor, law: str = "gaussian") -> Tensor:
    """Integer noise j in {-m..m} (``radius`` m broadcasts against ``like``), as ``like``'s dtype.

    gaussian: round(N(0, 1) * m / 2) clipped to +-m; uniform: each integer of {-m..m} alike.
    """
    m = radius.to(torch.float32)
    if law == "gaussian":
        j = stream.sample("gaussian", like.shape, device=like.device).mul_(m / 2).round_()
        j = torch.maximum(torch.minimum(j, m), -m)
    else:
        p = stream.sample("uniform", like.shape, device=like.device).div_(2 * math.sqrt(3.0)).add_(0.5)  # (0, 1)
        j = torch.floor(p * (2 * m + 1)) - m
    return j.to(like.dtype)


def zoqo_deltas(codes: Tensor, j: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """``(d+, d-)`` with ``codes + d+ = clip(codes + j)`` and ``codes - d- = clip(codes - j)``."""
    return (codes + j).clamp_(qmin, qmax) - codes, codes - (codes - j).clamp_(qmin, qmax)


def zoqo_update_(codes: Tensor, j: Tensor, step: Tensor, direction: float, qmin: int, qmax: int) -> Tensor:
    """``codes <- clip(codes - step * direction * sign(j))`` in place; stays on the integer grid."""
    move = (step * torch.sign(j)).to(codes.dtype)
    if direction > 0:
        codes.sub_(move)
    elif direction < 0:
        codes.add_(move)
    return codes.clamp_(qmin, qmax)
