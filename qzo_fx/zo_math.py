"""Zeroth-order numerics as plain tensor functions (no graphs, no modules).

Everything works on lists of tensors, one per perturbed parameter, in the parameter's shape.
Notation follows algorithms.md: eps = scale * eps_bar per coordinate, z = theta / eps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from qzo_fx.workspace import Workspace

__all__ = ["EPS_BAR", "NOISE_LAW", "smoothing_of", "NoiseStream", "sample_like", "fogzo_directions", "combine",
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


class NoiseStream:
    """Seeded source of perturbation noise.

    Uniform-based laws are built from 16-bit integers cut from SFC64 raw output: on CPU that is
    ~4x faster than torch's generator, and noise sampling is a large share of a ZO step. The
    65,536 levels are centred (mean exactly 0) and rescaled to unit variance. The same seed
    gives the same stream on every machine, which distributed ranks rely on.
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.Generator(np.random.SFC64(seed))

    def sign(self) -> float:
        return 1.0 if self._rng.random() < 0.5 else -1.0

    def _levels(self, out: Tensor, scale: float, accumulate: bool = False) -> Tensor:
        """Fill (or add to) flat ``out`` with i.i.d. values uniform on the 65,536 centred levels
        of (-scale, scale)."""
        words = self._rng.bit_generator.random_raw((out.numel() + 3) // 4)
        raw = torch.from_numpy(words.view(np.int16)[: out.numel()])
        if accumulate:
            return out.add_(raw.to(out.dtype).add_(0.5), alpha=scale / 32768.0)
        return out.copy_(raw).add_(0.5).mul_(scale / 32768.0)

    def fill(self, law: str, out: Tensor) -> Tensor:
        """Fill the flat CPU tensor ``out`` with i.i.d. noise of mean 0 and variance 1 from ``law``."""
        if law == "uniform":
            return self._levels(out, math.sqrt(3.0))
        if law == "triangular":
            # The sum of two uniforms on (-a/2, a/2) is triangular on (-a, a), variance a^2/6.
            self._levels(out, math.sqrt(6.0) / 2.0)
            return self._levels(out, math.sqrt(6.0) / 2.0, accumulate=True)
        if law == "logistic":
            # Logistic(0, s) has variance s^2 pi^2 / 3; s = sqrt(3) / pi gives unit variance.
            p = self._levels(out, 1.0).add_(1.0).mul_(0.5)
            return p.div_(1.0 - p).log_().mul_(math.sqrt(3.0) / math.pi)
        if law == "gaussian":
            return out.copy_(torch.from_numpy(self._rng.standard_normal(out.numel(), dtype=np.float32)))
        raise ValueError(f"unknown noise law {law!r}")

    def sample(self, law: str, shape: Sequence[int], dtype=torch.float32, device=None) -> Tensor:
        """A fresh tensor of i.i.d. noise of mean 0 and variance 1 from ``law``."""
        out = self.fill(law, torch.empty(math.prod(shape), dtype=torch.float32))
        return out.reshape(shape).to(dtype=dtype, device=device)


def _norms(parts: Tensors, per_tensor: bool) -> Optional[list[float]]:
    """Norm of ``parts`` (one global, or one per tensor); None if any is zero or not finite."""
    norms = torch._foreach_norm(parts)
    if per_tensor:
        values = torch.stack(norms).tolist()
    else:
        values = [float(torch.linalg.vector_norm(torch.stack(norms)))] * len(parts)
    return None if any(n == 0.0 or not math.isfinite(n) for n in values) else values


def sample_like(stream: NoiseStream, laws: Sequence[str], like: Tensors,
                workspace: Optional[Workspace] = None, key: object = "u") -> Tensors:
    """Noise shaped like each tensor of ``like``: one draw per law into one flat buffer, split
    into views. With a workspace the buffers are reused across calls with the same ``key``."""
    workspace = Workspace.get(workspace)
    out: list[Optional[Tensor]] = [None] * len(like)
    for law in dict.fromkeys(laws):
        members = [i for i, l in enumerate(laws) if l == law]
        sizes = [like[i].numel() for i in members]
        cpu = workspace.buffer((key, law), (sum(sizes),), torch.empty(0))
        flat = stream.fill(law, cpu).to(dtype=like[members[0]].dtype, device=like[members[0]].device)
        for i, part in zip(members, flat.split(sizes)):
            out[i] = part.view(like[i].shape)
    return out  # type: ignore[return-value]


def fogzo_directions(grads: Tensors, eps: Tensors, laws: Sequence[str], beta: float, n: int,
                     stream: NoiseStream, normalize: str = "global", noise: str = "per_coordinate",
                     workspace: Optional[Workspace] = None) -> Optional[list[Tensors]]:
    """The n FOGZO directions ``v_i = sqrt(beta) s_i g_hat + sqrt(1 - beta) u_i`` in z-space.

    ``g_hat`` is the unit vector of ``eps * g`` (``eps`` may be any shape that broadcasts to its
    parameter). Returns None when that vector is zero: the caller keeps the STE gradient.
    With a workspace, the directions are views of its buffers (valid until the next call).
    """
    workspace = Workspace.get(workspace)
    g_z = [torch.mul(g, e, out=buf) for g, e, buf in zip(grads, eps, workspace.like("g_z", grads))]
    norms = _norms(g_z, per_tensor=normalize == "per_tensor")
    if norms is None:
        return None
    a, b = math.sqrt(beta), math.sqrt(max(1.0 - beta, 0.0))
    directions = []
    for _ in range(n):
        s = stream.sign()
        if b == 0.0:
            directions.append([torch.mul(gz, a * s / nz, out=buf)
                               for gz, nz, buf in zip(g_z, norms, workspace.like(("v", len(directions)), g_z))])
            continue
        u = sample_like(stream, laws, grads, workspace, key=("u", len(directions)))
        if noise == "unit_norm":
            u_norm = _norms(u, per_tensor=False)
            if u_norm:
                torch._foreach_div_(u, u_norm[0])
        # b * (u + (a s / (b |g_z|)) g_z), in place on the fresh noise.
        for ui, gz, nz in zip(u, g_z, norms):
            ui.add_(gz, alpha=a * s / (b * nz)).mul_(b)
        directions.append(u)
    return directions


def combine(coefficients: Sequence[float], directions: Sequence[Tensors], eps: Tensors,
            out: Optional[Tensors] = None) -> Tensors:
    """``G_j = (1/n) sum_i c_i v_ij / eps_j``: back from z-space to parameter units (into ``out``
    when given, e.g. the parameters' ``.grad``)."""
    n = len(directions)
    out = out if out is not None else [torch.empty_like(v) for v in directions[0]]
    for j, acc in enumerate(out):
        torch.mul(directions[0][j], float(coefficients[0]) / n, out=acc)
        for c, v in zip(coefficients[1:], directions[1:]):
            acc.add_(v[j], alpha=float(c) / n)
        acc.div_(eps[j])
    return out


def zoqo_noise(stream: NoiseStream, radius: Tensor, like: Tensor, law: str = "gaussian") -> Tensor:
    """Integer noise j in {-m..m} (``radius`` m broadcasts against ``like``), as ``like``'s dtype.

    gaussian: round(N(0, 1) * m / 2) clipped to +-m; uniform: each integer of {-m..m} alike.
    """
    m = radius.to(torch.float32)
    if law == "gaussian":
        j = stream.sample("gaussian", like.shape).mul_(m / 2).round_()
        j = torch.maximum(torch.minimum(j, m), -m)
    else:
        p = stream.sample("uniform", like.shape).div_(2 * math.sqrt(3.0)).add_(0.5)  # (0, 1)
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
