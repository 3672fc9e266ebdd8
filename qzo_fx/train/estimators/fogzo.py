"""FOGZO: the STE gradient steers a random perturbation; finite differences of the real quantized
loss size it (docs/algorithms.md, "FOGZO step"; the math in plain torch: reference.fogzo)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from qzo_fx.config import check_field_types, known_keywords
from qzo_fx.errors import TrainStepError
from qzo_fx.train.estimators.base import PERTURB, Estimator, check_setting
from qzo_fx.train.estimators.ste import ste_step

__all__ = ["FOGZO", "beta_for_share"]

DEFAULT_BETA_MIN = 0.999


def beta_for_share(share: float, dim: int, noise: str = "per_coordinate") -> float:
    """The beta at which the guided part ``sqrt(beta) s g_hat`` carries ``share`` of ``E||v||^2``.

    With per-coordinate noise ``E||v||^2 = beta + (1 - beta) d``, so the share is
    ``beta / (beta + (1 - beta) d)`` and ``beta = share d / (1 - share + share d)``; with unit-norm
    noise ``E||v||^2 = 1`` and ``beta = share``.

    Example:
        >>> round(beta_for_share(0.5, 1000), 6)  # half of the direction's energy on the guide
        0.999001
    """
    if noise == "unit_norm" or share in (0.0, 1.0):
        return share
    return share * dim / (1.0 - share + share * dim)


@known_keywords
@dataclass(frozen=True)
class FOGZO(Estimator):
    """First-order-guided zeroth-order estimator.

    The STE gradient steers a random perturbation ``v = sqrt(beta) s g_hat + sqrt(1-beta) u``;
    ``n`` two-sided (or one-sided) finite differences of the real quantized loss give
    ``G = mean_i c_i v_i / eps``, which replaces the STE gradient in ``.grad``.

    Args:
        n: directions per step.
        beta_min: end of the linear beta schedule (beta goes 1 -> beta_min over the FOGZO steps);
            default 0.999 unless ``guide_share`` is given.
        guide_share: instead of ``beta_min``, the share of ``E||v||^2`` the guided part keeps at
            the end of the schedule: ``beta / (beta + (1 - beta) d)`` for d perturbed coordinates
            (per-coordinate noise; with unit-norm noise the share is beta). One setting then
            means the same on an MLP and on a LLaMA; beta_min follows from it and d.
        total_steps: steps of the schedule (0 = constant beta_min).
        schedule: "linear" or "constant".
        ste_fraction: first fraction of ``total_steps`` trained with plain STE ("r% STE").
        two_sided: two forwards per direction (else one, against the base loss).
        perturb: "quantized" (latent weights feeding quantizers) or "all" trainable parameters.
        normalize: norm of ``g_hat`` over the whole set ("global") or per tensor.
        noise: "per_coordinate" (u of unit variance per coordinate, the paper's form) or
            "unit_norm" (u rescaled to unit norm over the set).
        eps_float: perturbation size of parameters that feed no quantizer (perturb="all").
        seed: base seed; step t draws from ``seed + t``. None draws a seed from torch.

    Example:
        >>> FOGZO(beta_min=0.999, total_steps=100).beta(50)
        0.9995
    """

    n: int = 1
    beta_min: Optional[float] = None
    total_steps: int = 0
    schedule: str = "linear"
    ste_fraction: float = 0.0
    two_sided: bool = True
    perturb: str = "quantized"
    normalize: str = "global"
    noise: str = "per_coordinate"
    eps_float: float = 1e-3
    seed: Optional[int] = None
    guide_share: Optional[float] = None

    def __post_init__(self) -> None:
        check_field_types(self)
        check_setting(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an int >= 1")
        check_setting(self.beta_min is None or 0.0 <= self.beta_min <= 1.0, "beta_min", self.beta_min,
                      "a float in [0, 1]")
        check_setting(self.guide_share is None or 0.0 <= self.guide_share <= 1.0, "guide_share", self.guide_share,
                      "a float in [0, 1]")
        check_setting(self.beta_min is None or self.guide_share is None, "guide_share", self.guide_share,
                      "None when beta_min is given (set one of the two)")
        check_setting(self.schedule in ("linear", "constant"), "schedule", self.schedule, "'linear' or 'constant'")
        check_setting(0.0 <= self.ste_fraction < 1.0, "ste_fraction", self.ste_fraction, "a float in [0, 1)")
        check_setting(self.ste_fraction == 0.0 or self.total_steps > 0, "ste_fraction", self.ste_fraction,
                      "0 unless total_steps is set (it is a fraction of total_steps)")
        check_setting(self.perturb in PERTURB, "perturb", self.perturb, f"one of {PERTURB}")
        check_setting(self.normalize in ("global", "per_tensor"), "normalize", self.normalize,
                      "'global' or 'per_tensor'")
        check_setting(self.noise in ("per_coordinate", "unit_norm"), "noise", self.noise,
                      "'per_coordinate' or 'unit_norm'")
        check_setting(self.eps_float > 0, "eps_float", self.eps_float, "a float > 0")
        check_setting(isinstance(self.total_steps, int) and self.total_steps >= 0, "total_steps", self.total_steps,
                      "an int >= 0")

    @property
    def ste_steps(self) -> int:
        return int(self.ste_fraction * self.total_steps)

    def end_beta(self, dim: Optional[int] = None) -> float:
        """beta at the end of the schedule (``dim``: perturbed coordinates, for ``guide_share``)."""
        if self.guide_share is None:
            return DEFAULT_BETA_MIN if self.beta_min is None else self.beta_min
        if dim is None:
            raise TrainStepError("FOGZO(guide_share=...) needs the number of perturbed coordinates: beta(step, dim=d).")
        return beta_for_share(self.guide_share, dim, self.noise)

    def beta(self, step: int, dim: Optional[int] = None) -> float:
        """beta at training step ``step`` (counted from 0, STE steps included)."""
        end = self.end_beta(dim)
        span = self.total_steps - self.ste_steps
        if self.schedule == "constant" or span <= 0:
            return end
        t = min(max(step - self.ste_steps, 0), span)
        return 1.0 - (1.0 - end) * t / span

    @property
    def branches(self) -> int:
        return self.n * (2 if self.two_sided else 1)

    @property
    def fwd_equivalents(self) -> int:
        return 3 + self.branches

    def setup(self, step: Any) -> None:
        step.use_perturbed(self.perturb, reuse_base=True)

    def run(self, step: Any, batch: Any) -> Tensor:
        if step.step_index < self.ste_steps:
            return ste_step(step, batch)
        loss, rng_state = step.base_pass(batch)
        beta = self.beta(step.step_index, step.perturbed_numel)
        step.stats.beta = beta
        eps, grads = step.eps(self.eps_float), step.gradients()
        directions = step.directions(step.laws, self.n, grads=grads, eps=eps, beta=beta, normalize=self.normalize,
                                     noise_form=self.noise)
        if directions.guide_norms is not None:
            step.check.add("STE gradient", directions.guide_norms, step.names)
        else:
            step.check.add_norms("STE gradient", grads, step.names)
        step.check_other_gradients()
        if not self.two_sided:
            step.refuse_batched_masks("one-sided FOGZO differences each branch against the base loss")
        signs = (1.0, -1.0) if self.two_sided else (1.0,)
        branches = step.branches(directions, [(k, s) for k in range(self.n) for s in signs], eps)
        losses = step.branch_losses(branches, batch, rng_state)
        c = (losses[0::2] - losses[1::2]) / 2 if self.two_sided else losses - step.mean_over_ranks(loss)
        zero = directions.zero_guide
        step.write_estimate(directions, branches, c, keep=None if zero is None else ~zero)
        if zero is not None:
            step.watch("zero guide", zero)
        return loss
