"""ZOQO: zeroth-order steps on integer codes that never leave the grid (reference.zoqo)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from qzo_fx.config import check_field_types, known_keywords
from qzo_fx.train.estimators.base import Estimator, check_setting
from qzo_fx.train.noise import UNIFORM_HALF_WIDTH, noise_key
from qzo_fx.train.rng import RngState

__all__ = ["ZOQO"]


@known_keywords
@dataclass(frozen=True)
class ZOQO(Estimator):
    """Zeroth-order quantized optimization: weights stay integer codes on the grid.

    Per step, with s the quantization step of each weight (per channel where scales are):
    ``m = max(floor(mu / s), 1)``; integer noise ``j`` in ``{-m..m}``; two queries
    ``l+- = L(clip(k +- j))`` on the same batch; ``k <- clip(k - max(floor(lr / s), 1) *
    sign(l+ - l-) * sign(j))``. No autograd, no optimizer state. Needs a model switched with
    :func:`qzo_fx.to_integer_codes`.

    Args:
        lr: step size in value units (at least one grid step is taken where it is smaller).
        mu: noise radius in value units (at least one grid step).
        noise: law of ``j``: "gaussian" (std m/2, rounded, clipped to +-m) or "uniform" on {-m..m}.
        seed: base seed; step t draws from ``seed + t``.

    Example:
        >>> ZOQO(lr=0.0, mu=0.0).branches
        2
    """

    lr: float = 0.0
    mu: float = 0.0
    noise: str = "gaussian"
    seed: Optional[int] = None

    branches = 2
    fwd_equivalents = 2

    def __post_init__(self) -> None:
        check_field_types(self)
        check_setting(self.lr >= 0, "lr", self.lr, "a float >= 0 (0 = one grid step)")
        check_setting(self.mu >= 0, "mu", self.mu, "a float >= 0 (0 = one grid step)")
        check_setting(self.noise in ("gaussian", "uniform"), "noise", self.noise, "'gaussian' or 'uniform'")

    def setup(self, step: Any) -> None:
        step.use_codes()

    def _noise(self, step: Any, i: int, codes: Tensor, radius: Tensor) -> Tensor:
        """Integer noise in ``{-m..m}`` (reference.zoqo_noise, with the step's noise streams)."""
        draw = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
        m = radius.to(torch.float32)
        if self.noise == "gaussian":
            j = step.noise.fill(draw, "gaussian", noise_key(step.step_seed, 0, i)).mul_(m / 2).round_()
            j = torch.maximum(torch.minimum(j, m), -m)
        else:
            p = step.noise.fill(draw, "uniform", noise_key(step.step_seed, 0, i)).div_(2 * UNIFORM_HALF_WIDTH).add_(0.5)
            j = torch.floor(p * (2 * m + 1)) - m
        return j.to(codes.dtype)

    def run(self, step: Any, batch: Any) -> Tensor:
        rng_state = RngState.capture()
        quantizers = step.code_quantizers
        steps = [q.step_size(q.codes.float()) for q in quantizers]
        noise, plus, minus = [], [], []
        for i, (q, s) in enumerate(zip(quantizers, steps)):
            j = self._noise(step, i, q.codes, torch.clamp_min(torch.floor(self.mu / s), 1))
            qmin, qmax = q.spec.qrange
            noise.append(j)
            plus.append(_on_grid(q, q.codes, q.codes + j) - q.codes)     # codes + d+ = clip(codes + j)
            minus.append(q.codes - _on_grid(q, q.codes, q.codes - j))    # codes - d- = clip(codes - j)
        deltas = [plus, minus]
        branches = step.explicit_branches(deltas, [(0, 1.0), (1, -1.0)])
        losses = step.branch_losses(branches, batch, rng_state)
        # No move where the losses are not finite (the step then raises or skips, see checks).
        difference = losses[0] - losses[1]
        direction = torch.where(torch.isfinite(difference), torch.sign(difference), torch.zeros_like(difference))
        with torch.no_grad():
            for q, j, s in zip(quantizers, noise, steps):
                moves = torch.clamp_min(torch.floor(self.lr / s), 1)
                q.codes.copy_(_on_grid(q, q.codes, q.codes - (moves * direction * torch.sign(j)).to(q.codes.dtype)))
        step.update_norm_statistics(batch)
        return losses.mean()


def _on_grid(q: Any, codes: Tensor, moved: Tensor) -> Tensor:
    """``moved`` clipped to the quantizer's codes. The 1-bit sign grid is {-1, +1}: a move
    through 0 lands on the other sign (0 would be a weight of zero, not on the grid)."""
    qmin, qmax = q.spec.qrange
    clipped = moved.clamp(qmin, qmax)
    return torch.where(clipped == 0, -codes, clipped) if q.is_sign else clipped
