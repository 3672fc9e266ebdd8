"""``sequential``: the branch graph once per branch, the perturbed values bound as its leading
inputs (``theta`` is never written). Hoisted weights are perturbed and quantized by the graph's
prologue (:mod:`qzo_fx.train.prologue`); the rest are perturbed into reused buffers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qzo_fx.train.prologue import PROLOGUE
from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies.base import Branches, BranchModel, Strategy, StrategyContext, apply_delta

__all__ = ["Sequential"]


class Sequential(Strategy):
    name = "sequential"

    def __init__(self, ctx: StrategyContext, graph) -> None:
        super().__init__(ctx)
        self._graph = graph

    def run(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        ctx, graph = self.ctx, self._graph()
        prologue, run = getattr(graph, PROLOGUE, None), ctx.compiled(graph)
        values = ctx.workspace.like("values", ctx.params)
        out = []
        for k, sign in branches.pattern:
            for i, (theta, value) in enumerate(zip(ctx.params, values)):
                v, eps = branches.delta(k, i)
                if prologue is None or not prologue.perturb_quantize(i, value, theta, v, eps, sign):
                    apply_delta(theta, v, eps, sign, out=value)
            out.append(ctx.loss(BranchModel(run, ctx.model, values), batch, rng_state))
        return torch.stack(out)
