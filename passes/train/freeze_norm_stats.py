"""Freeze functional batch-norm statistics in branch graphs.

Branches use batch statistics but never update running statistics. A BatchNorm *module* gets
that from ``track_running_stats = False`` while the branches run; a graph from torch.export has
no module, only ``aten.batch_norm(x, w, b, running_mean, running_var, training=True, ...)``,
which updates the statistics in place (and under ``vmap`` cannot: they are not batched). This
pass passes ``None`` for the running statistics of every training-mode call, which is the same
normalisation without the update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext

__all__ = ["freeze_norm_stats"]

# target -> (running_mean index, running_var index, training index, training keyword)
_NORMS = {
    torch.ops.aten.batch_norm.default: (3, 4, 5, "training"),
    F.batch_norm: (1, 2, 5, "training"),
}


def freeze_norm_stats(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind == "base":
        return PassResult(gm, False)  # the base pass updates the running statistics
    modified = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _NORMS:
            continue
        mean_at, var_at, training_at, training_key = _NORMS[node.target]
        args = list(node.args)
        training = args[training_at] if len(args) > training_at else node.kwargs.get(training_key, False)
        if training is not True or len(args) <= var_at:
            continue
        statistics = (args[mean_at], args[var_at])
        args[mean_at] = args[var_at] = None
        node.args = tuple(args)
        for read in statistics:  # a buffer read no one uses now
            if isinstance(read, torch.fx.Node) and read.op == "get_attr" and not read.users:
                gm.graph.erase_node(read)
        modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
