"""``lean``: the model's graph with every perturbed read streamed through ``qzo_perturber``,
which computes ``theta_i + sign * eps_i * v_ki`` from tensor i's own stream right where the
layer needs it. The perturbed copy lives until its layer has used it, so the extra memory is
about the largest perturbed tensor; the price is drawing the noise again per branch (and for
the estimate). theta is never written.

Where there is no graph to stream through -- a model sharded with FSDP2, whose branches must run
through its hooks -- :class:`LeanInplace` adds each tensor's direction, drawn alone, to the
parameter (a shard) in place: the extra memory is the snapshot that restores theta exactly plus
about the largest tensor.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies.base import Branches, BranchModel, Strategy, StrategyContext, apply_delta
from qzo_fx.train.strategies.inplace import Inplace

__all__ = ["Lean", "LeanInplace", "Perturber"]


class Perturber(nn.Module):
    """``forward(theta, i) = theta + sign * eps_i * v_ki``, ``v_ki`` regenerated on the spot."""

    def __init__(self) -> None:
        super().__init__()
        self.branches: Optional[Branches] = None
        self.k, self.sign = 0, 1.0

    def forward(self, theta: Tensor, index: int) -> Tensor:
        v, eps = self.branches.delta(self.k, index, direction=self.branches.tensor(self.k, index))
        if eps is None:  # integer steps (ZOQO): held by the estimator, never overwritten
            return apply_delta(theta, v, None, self.sign, out=torch.empty_like(theta))
        return apply_delta(theta, v, eps, self.sign, out=v)  # v was drawn for this read: its memory holds the result


class Lean(Strategy):
    name = "lean"

    def __init__(self, ctx: StrategyContext, graph) -> None:
        super().__init__(ctx)
        self._graph = graph

    def run(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        graph = self._graph()
        perturber = graph.get_submodule("qzo_perturber")
        perturber.branches = branches
        out = []
        try:
            for k, sign in branches.pattern:
                perturber.k, perturber.sign = k, sign
                out.append(self.ctx.loss(BranchModel(graph, self.ctx.model, ()), batch, rng_state))
        finally:
            perturber.branches = None  # hold no step's tensors between steps
        return torch.stack(out)


class LeanInplace(Inplace):
    """``inplace`` with each direction drawn for one tensor at a time (none materialized)."""

    name = "lean"

    def delta(self, branches: Branches, k: int, i: int) -> tuple[Tensor, Optional[Tensor]]:
        return branches.delta(k, i, direction=branches.tensor(k, i))
