"""What every estimator is: validated, frozen settings with the step they own.

``setup(step)`` runs once when :func:`qzo_fx.train_step` builds the step (it chooses what is
perturbed); ``run(step, batch)`` is one training step: it writes the estimate into ``.grad``
(ZOQO moves its codes instead), registers what must be finite with ``step.check``, and returns
the loss. ``step`` is the :class:`~qzo_fx.train.step.TrainStep`; estimators use its services
(the base pass, the branches, eps, the noise) and never its strategies directly.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from qzo_fx.errors import ConfigError

__all__ = ["Estimator", "check_setting", "PERTURB"]

PERTURB = ("quantized", "all")


def check_setting(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


class Estimator:
    """Base of the estimators (each a frozen dataclass of its settings)."""

    @property
    def branches(self) -> int:
        """Branch forwards per step."""
        return 0

    @property
    def fwd_equivalents(self) -> int:
        """Cost per step in forward passes: a forward counts 1, a backward 2."""
        return 3

    def setup(self, step: Any) -> None:
        """Choose what the step perturbs (nothing by default)."""

    def run(self, step: Any, batch: Any) -> Tensor:
        raise NotImplementedError
