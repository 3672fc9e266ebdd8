"""What the branch-graph passes are told: which parameters are perturbed, and for which strategy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["BranchContext", "KINDS"]

KINDS = ("lifted", "sequential", "streamed", "base")


@dataclass(frozen=True)
class BranchContext:
    """``kind``: "lifted" (the branch graph: batched, and the base of the others), "sequential"
    (lifted, weight q/dq hoisted into a prologue, first convolutions from the base pass),
    "streamed" (lean: perturbed reads go through ``qzo_perturber``) or "base" (the base pass's
    graph with its first convolutions tapped)."""

    names: tuple[str, ...]  # perturbed parameters (or ZOQO's code buffers), in input order
    kind: str = "lifted"
    taps: Optional[Any] = None  # the base pass's BaseTaps where sequential branches reuse it
