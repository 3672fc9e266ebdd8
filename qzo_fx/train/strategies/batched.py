"""``batched``: every branch in one pass, the branch graph under ``torch.func.vmap`` with each
lifted parameter stacked on a leading branch axis (chunks of at most ``max_chunk`` branches).

Meant for accelerators: on a CPU a stack of branches gains nothing over running them one after
another (docs/performance.md). Under vmap dropout is drawn by ``bernoulli_``; on CUDA eager
dropout is a fused kernel that consumes the generator differently, so there the branches share
one mask with each other but not with the base pass (:func:`masks_differ`).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from qzo_fx.train.random_ops import uses_aten_dropout, uses_randomness
from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies.base import Branches, BranchModel, Strategy, StrategyContext, apply_delta

__all__ = ["Batched", "masks_differ"]


def masks_differ(ctx: StrategyContext) -> bool:
    """True where batched branches cannot see the base pass's dropout masks: a model that draws
    random numbers, on CUDA; or aten dropout in a torch.export graph, on any device."""
    if uses_aten_dropout(ctx.model) and ctx.model.training:
        return True
    return any(p.device.type == "cuda" for p in ctx.params) and uses_randomness(ctx.model)


class Batched(Strategy):
    name = "batched"

    def __init__(self, ctx: StrategyContext, graph) -> None:
        super().__init__(ctx)
        self._graph, self._warned = graph, False

    def run(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        ctx, graph = self.ctx, self._graph()
        if not self._warned and masks_differ(ctx):
            self._warned = True
            warnings.warn("strategy='batched' with dropout drawn differently under vmap (CUDA's fused dropout, or "
                          "aten dropout in a torch.export graph): the branches share one mask with each other but "
                          "not with the base pass. Use strategy='sequential' for the base pass's masks.",
                          RuntimeWarning, stacklevel=4)

        def one(*values: Tensor) -> Tensor:
            return ctx.loss_fn(BranchModel(graph, ctx.model, values), batch).reshape(())

        batched = torch.func.vmap(one, randomness="same")
        out, pattern = [], branches.pattern
        for start in range(0, len(pattern), ctx.max_chunk):
            chunk = pattern[start:start + ctx.max_chunk]
            stacked = [ctx.workspace.buffer(("stacked", i), (len(chunk), *p.shape), p)
                       for i, p in enumerate(ctx.params)]
            for b, (k, sign) in enumerate(chunk):
                for i, p in enumerate(ctx.params):  # straight into the stacked buffers: no torch.stack copy
                    apply_delta(p, *branches.delta(k, i), sign, out=stacked[i][b])
            rng_state.restore()
            out.append(batched(*stacked).detach())
        return torch.cat(out)
