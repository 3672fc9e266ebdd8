"""Branch strategies, one file each behind one interface (:class:`~qzo_fx.train.strategies.base.Strategy`).

=============  ==================================================================================
inplace        write theta + delta into the parameters, run the model, restore from a copy
sequential     the branch graph once per branch, perturbed values bound as inputs
batched        the branch graph under vmap, branches stacked on a leading axis
lean           perturbations streamed tensor by tensor (extra memory about the largest tensor);
               on an FSDP2 model, added to the shards in place one tensor at a time
auto           the fastest of sequential, inplace and batched, timed on the first steps
=============  ==================================================================================
"""
from __future__ import annotations

from typing import Callable, Optional

from qzo_fx.train.strategies.auto import AUTO_ROUNDS, Auto
from qzo_fx.train.strategies.base import Branches, BranchModel, Strategy, StrategyContext
from qzo_fx.train.strategies.batched import Batched, masks_differ
from qzo_fx.train.strategies.inplace import Inplace
from qzo_fx.train.strategies.lean import Lean, LeanInplace
from qzo_fx.train.strategies.sequential import Sequential

__all__ = ["AUTO_ROUNDS", "STRATEGIES", "Auto", "Batched", "Branches", "BranchModel", "Inplace", "Lean",
           "LeanInplace", "Sequential", "Strategy", "StrategyContext", "build", "masks_differ"]

STRATEGIES = ("auto", "inplace", "sequential", "batched", "lean")


def build(name: str, ctx: StrategyContext, graph: Optional[Callable[[str], Callable]]) -> Strategy:
    """The strategy ``name`` for ``ctx``; ``graph(kind)`` gives a getter of the branch graph of that
    kind (None for a partially captured model, which only ``inplace`` serves)."""
    makers = {
        "inplace": lambda: Inplace(ctx),
        "sequential": lambda: Sequential(ctx, graph("sequential")),
        "batched": lambda: Batched(ctx, graph("lifted")),
        # No graph (an FSDP2 model): the lean idea in place, one tensor's direction at a time.
        "lean": lambda: LeanInplace(ctx) if graph is None else Lean(ctx, graph("streamed")),
    }
    if name != "auto":
        return makers[name]()
    # batched: CUDA's dropout masks differ under vmap; torch.compile is not applied to vmap.
    candidates = ["sequential", "inplace"] + ([] if masks_differ(ctx) or ctx.compiling else ["batched"])
    return Auto(ctx, [makers[c]() for c in candidates])
