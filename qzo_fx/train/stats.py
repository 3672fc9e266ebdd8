"""What a training step counts: compute in forward-pass equivalents, time, faults."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["StepStats"]


@dataclass
class StepStats:
    """Compute accounting (fwd = 1, bwd = 2 forward-pass equivalents), timing and faults."""

    steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    branch_seconds: float = 0.0
    step_seconds: float = 0.0
    beta: Optional[float] = None
    nonfinite_skips: int = 0
    zero_gradient_fallbacks: int = 0
    strategy: Optional[str] = None
    last_branch_losses: list[float] = field(default_factory=list)

    @property
    def fwd_equivalents(self) -> int:
        return self.forward_passes + 2 * self.backward_passes
