"""``inplace``: write the perturbed values into the parameters, run the model, restore exactly.

MeZO's idea without its drift: theta is restored from a full-precision copy after every branch
(never ``theta + d - d``), so the parameters are bit-identical afterwards, also when a branch
raises (Ctrl-C included).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies.base import Branches, Strategy, apply_delta

__all__ = ["Inplace"]


class Inplace(Strategy):
    name = "inplace"

    def run(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        params = self.ctx.params
        snapshot = self.ctx.workspace.like("snapshot", params)
        torch._foreach_copy_(snapshot, params)
        out = []
        try:
            for k, sign in branches.pattern:
                torch._foreach_copy_(params, snapshot)
                for i, p in enumerate(params):
                    apply_delta(p, *self.delta(branches, k, i), sign)
                out.append(self.ctx.loss(self.ctx.compiled(self.ctx.model), batch, rng_state))
        finally:
            torch._foreach_copy_(params, snapshot)
        return torch.stack(out)

    def delta(self, branches: Branches, k: int, i: int) -> tuple[Tensor, Optional[Tensor]]:
        """Direction k on tensor i and its eps (the materialized directions)."""
        return branches.delta(k, i)
