"""Gradient estimators: plain, validated settings objects read by :func:`qzo_fx.train_step`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qzo_fx.errors import ConfigError

__all__ = ["STE", "FOGZO", "NSPSA", "ZOSign", "ZOQO", "Estimator"]

_PERTURB = ("quantized", "all")


def _check(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


@dataclass(frozen=True)
class STE:
    """Plain straight-through estimator: one forward, one backward.

    Example:
        >>> STE().fwd_equivalents
        3
    """

    fwd_equivalents = 3  # fwd = 1, bwd = 2


@dataclass(frozen=True)
class FOGZO:
    """First-order-guided zeroth-order estimator (algorithms.md, "FOGZO step").

    The STE gradient steers a random perturbation ``v = sqrt(beta) s g_hat + sqrt(1-beta) u``;
    ``n`` two-sided (or one-sided) finite differences of the real quantized loss give
    ``G = mean_i c_i v_i / eps``, which replaces the STE gradient in ``.grad``.

    Args:
        n: directions per step.
        beta_min: end of the linear beta schedule (beta goes 1 -> beta_min over the FOGZO steps).
        total_steps: steps of the schedule (required for schedule="linear"; 0 = constant beta_min).
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
    beta_min: float = 0.999
    total_steps: int = 0
    schedule: str = "linear"
    ste_fraction: float = 0.0
    two_sided: bool = True
    perturb: str = "quantized"
    normalize: str = "global"
    noise: str = "per_coordinate"
    eps_float: float = 1e-3
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an int >= 1")
        _check(0.0 <= self.beta_min <= 1.0, "beta_min", self.beta_min, "a float in [0, 1]")
        _check(self.schedule in ("linear", "constant"), "schedule", self.schedule, "'linear' or 'constant'")
        _check(0.0 <= self.ste_fraction < 1.0, "ste_fraction", self.ste_fraction, "a float in [0, 1)")
        _check(self.perturb in _PERTURB, "perturb", self.perturb, f"one of {_PERTURB}")
        _check(self.normalize in ("global", "per_tensor"), "normalize", self.normalize, "'global' or 'per_tensor'")
        _check(self.noise in ("per_coordinate", "unit_norm"), "noise", self.noise, "'per_coordinate' or 'unit_norm'")
        _check(self.eps_float > 0, "eps_float", self.eps_float, "a float > 0")
        _check(isinstance(self.total_steps, int) and self.total_steps >= 0, "total_steps", self.total_steps, "an int >= 0")

    @property
    def ste_steps(self) -> int:
        return int(self.ste_fraction * self.total_steps)

    def beta(self, step: int) -> float:
        """beta at training step ``step`` (counted from 0, STE steps included)."""
        span = self.total_steps - self.ste_steps
        if self.schedule == "constant" or span <= 0:
            return self.beta_min
        t = min(max(step - self.ste_steps, 0), span)
        return 1.0 - (1.0 - self.beta_min) * t / span

    @property
    def branches(self) -> int:
        return self.n * (2 if self.two_sided else 1)

    @property
    def fwd_equivalents(self) -> int:
        return 3 + self.branches


@dataclass(frozen=True)
class NSPSA:
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
    """

    n: int = 1
    noise: str = "smoothing"
    eps: Optional[float] = None
    perturb: str = "all"
    eps_float: float = 1e-3
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an int >= 1")
        _check(self.noise in ("smoothing", "gaussian"), "noise", self.noise, "'smoothing' or 'gaussian'")
        _check(self.eps is None or self.eps > 0, "eps", self.eps, "None or a float > 0")
        _check(self.perturb in _PERTURB, "perturb", self.perturb, f"one of {_PERTURB}")
        _check(self.eps_float > 0, "eps_float", self.eps_float, "a float > 0")

    @property
    def branches(self) -> int:
        return 2 * self.n

    @property
    def fwd_equivalents(self) -> int:
        return self.branches


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
        _check(self.variant in ("elementwise", "scalar"), "variant", self.variant, "'elementwise' or 'scalar'")


@dataclass(frozen=True)
class ZOQO:
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
    """

    lr: float = 0.0
    mu: float = 0.0
    noise: str = "gaussian"
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.lr >= 0, "lr", self.lr, "a float >= 0 (0 = one grid step)")
        _check(self.mu >= 0, "mu", self.mu, "a float >= 0 (0 = one grid step)")
        _check(self.noise in ("gaussian", "uniform"), "noise", self.noise, "'gaussian' or 'uniform'")

    branches = 2
    fwd_equivalents = 2
Estimator = STE | FOGZO | NSPSA | ZOSign | ZOQO
