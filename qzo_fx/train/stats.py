"""What a training step counts: compute in forward-pass equivalents, time, faults."""
from __future__ import annotations

import warnings
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
    flat_estimates: int = 0  # steps whose every branch loss equalled the base loss: a zero estimate
    strategy: Optional[str] = None
    last_branch_losses: list[float] = field(default_factory=list)

    def count_flat(self, base: list[float], branches: list[float], step_index: int, estimator: object) -> None:
        """Count (and warn once about) a step whose every branch loss equals the base loss to the
        last bit, so that the estimate on the perturbed tensors is exactly zero: either the
        perturbations moved no quantized code, or the loss moved by less than float32 resolves
        (a random-init DPT's depth output is ~1e-9, and its loss, ~1, cannot register that)."""
        if not base or not branches or any(b != base[0] for b in branches):
            return
        self.flat_estimates += 1
        if self.flat_estimates == 1:
            warnings.warn(f"step {step_index}: all {len(branches)} branch losses equal the base loss "
                          f"({base[0]:.6g}) to the last bit, so {type(estimator).__name__}'s estimate is zero on the "
                          "perturbed tensors (counted in stats.flat_estimates). Either the perturbations changed no "
                          "quantized weight code, or the loss moves by less than float32 resolves (outputs near zero "
                          "against a loss near 1); the STE gradient of the same step is not zero.", RuntimeWarning,
                          stacklevel=3)

    @property
    def fwd_equivalents(self) -> int:
        return self.forward_passes + 2 * self.backward_passes
