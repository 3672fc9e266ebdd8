"""n-SPSA and the two sign-based zeroth-order methods built on its branches (reference.nspsa,
reference.zo_sign)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from qzo_fx.config import check_field_types, known_keywords
from qzo_fx.train.directions import Directions
from qzo_fx.train.estimators.base import PERTURB, Estimator, check_setting
from qzo_fx.train.rng import RngState

__all__ = ["NSPSA", "ZOSign"]


@known_keywords
@dataclass(frozen=True)
class NSPSA(Estimator):
    """n-direction SPSA: ``G = mean_i [L(th + eps u_i) - L(th - eps u_i)] / 2 * u_i / eps``.

    Args:
        n: directions (2n forwards, no backward).
        noise: "smoothing" (u from each quantizer's STE noise law, eps = scale * eps_bar) or
            "gaussian" (u ~ N(0, I), MeZO).
        eps: a global perturbation size; None uses the per-quantizer eps = scale * eps_bar.
        perturb: "all" (every trainable parameter: there is no backward to train the rest) or
            "quantized".
        eps_float: eps of parameters that feed no quantizer when ``eps`` is None.
        seed: base seed, as for FOGZO.

    Example:
        >>> NSPSA(n=4).fwd_equivalents
        8
    """

    n: int = 1
    noise: str = "smoothing"
    eps: Optional[float] = None
    perturb: str = "all"
    eps_float: float = 1e-3
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        check_field_types(self)
        check_setting(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an int >= 1")
        check_setting(self.noise in ("smoothing", "gaussian"), "noise", self.noise, "'smoothing' or 'gaussian'")
        check_setting(self.eps is None or self.eps > 0, "eps", self.eps, "None or a float > 0")
        check_setting(self.perturb in PERTURB, "perturb", self.perturb, f"one of {PERTURB}")
        check_setting(self.eps_float > 0, "eps_float", self.eps_float, "a float > 0")

    @property
    def branches(self) -> int:
        return 2 * self.n

    @property
    def fwd_equivalents(self) -> int:
        return self.branches

    def setup(self, step: Any) -> None:
        step.use_perturbed(self.perturb)

    def _write(self, step: Any, directions: Directions, branches, c: Tensor) -> None:
        step.write_estimate(directions, branches, c)

    def run(self, step: Any, batch: Any) -> Tensor:
        rng_state = RngState.capture()
        params = step.params
        if self.eps is not None:
            eps = [torch.full((), self.eps, dtype=p.dtype, device=p.device) for p in params]
        else:
            eps = step.eps(self.eps_float)
        laws = ["gaussian" if self.noise == "gaussian" else law for law in step.laws]
        directions = step.directions(laws, self.n, eps=eps)
        branches = step.branches(directions, [(k, s) for k in range(self.n) for s in (1.0, -1.0)], eps)
        losses = step.branch_losses(branches, batch, rng_state)
        self._write(step, directions, branches, (losses[0::2] - losses[1::2]) / 2)
        step.update_norm_statistics(batch)
        return losses.mean()


@known_keywords
@dataclass(frozen=True)
class ZOSign(NSPSA):
    """Sign-based zeroth-order SGD on latent weights; two different methods, named apart:

    * ``variant="elementwise"`` -- ZO-SignSGD: ``G = sign(mean_i c_i u_i / eps)``, the
      element-wise sign of the averaged n-SPSA estimate.
    * ``variant="scalar"`` -- what ZO-Bench calls "ZO-SGD-Sign": ``G = mean_i sign(c_i) u_i``,
      the sign of each scalar finite difference times its direction.

    ``c_i = [L(th + eps u_i) - L(th - eps u_i)] / 2``; the other fields are :class:`NSPSA`'s.
    """

    variant: str = "elementwise"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_setting(self.variant in ("elementwise", "scalar"), "variant", self.variant,
                      "'elementwise' or 'scalar'")

    def _write(self, step: Any, directions: Directions, branches, c: Tensor) -> None:
        if self.variant == "scalar":
            step.write_estimate(directions, branches, torch.sign(c), divide_by_eps=False)
        else:
            step.write_estimate(directions, branches, c, then_sign=True)
