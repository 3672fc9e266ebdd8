"""The plain straight-through estimator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from qzo_fx.config import known_keywords
from qzo_fx.train.estimators.base import Estimator

__all__ = ["STE", "ste_step"]


def ste_step(step: Any, batch: Any) -> Tensor:
    """Base forward + backward; the STE gradient is left in ``.grad`` and checked."""
    loss, _ = step.base_pass(batch)
    named = step.named_gradients()
    step.check.add_norms("STE gradient", [g for _, g in named], [n for n, _ in named])
    return loss


@known_keywords
@dataclass(frozen=True)
class STE(Estimator):
    """Plain straight-through estimator: one forward, one backward.

    Example:
        >>> STE().fwd_equivalents
        3
    """

    def run(self, step: Any, batch: Any) -> Tensor:
        return ste_step(step, batch)
