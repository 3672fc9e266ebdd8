"""Lower the eval graph's folded-bias rounding where no BatchNorm fold took it.

The prepare pass :mod:`qzo_fx.passes.prepare.round_folded_bias` adds, after a BatchNorm, the
int32 rounding error of the bias that folding it creates. ``fold_batchnorm`` moves that rounding
into the int32 bias codes. Where the BatchNorm stays (``fold_batchnorm=False``, or a channel with
``k <= 0``), the op becomes its plain-ops kernel here: the file then computes the same error from
its constants (ONNX Runtime folds them to one per-channel Add), so it still equals the model.
"""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.round_folded_bias import folded_bias_error, is_folded_bias_rounding

__all__ = ["lower_bias_rounding"]


def lower_bias_rounding(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        if is_folded_bias_rounding(node):
            node.target = folded_bias_error  # torch.export traces it into aten ops
            modified = True
    return PassResult(gm, modified)
