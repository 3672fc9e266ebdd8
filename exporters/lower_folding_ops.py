"""Lower the eval graph's BatchNorm-folding ops where no fold took them.

The prepare pass :mod:`qzo_fx.passes.prepare.fold_eval_batchnorm` computes foldable BatchNorms
folded, with three ops; ``fold_batchnorm`` turns each site into a plain conv. Where the sites stay
(``fold_batchnorm=False``) the ops become their plain-op kernels here (``torch.where``, no
branch on a value), which torch.export traces into the file: it then computes the fold from its
constants, the same function as the model.
"""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.folded_batchnorm_ops import FOLDING_OPS

__all__ = ["lower_folding_ops"]


def lower_folding_ops(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FOLDING_OPS:
            node.target = FOLDING_OPS[node.target]
            modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
