"""The export lowering pipeline: a copy of the prepared model in its inference form."""
from __future__ import annotations

import copy

from torch.fx import GraphModule

from qzo_fx.pass_infra import Pass, PassManager
from qzo_fx.passes.cleanup import cleanup
from qzo_fx.exporters.fold_batchnorm import fold_batchnorm
from qzo_fx.exporters.lower_activations import lower_activations
from qzo_fx.exporters.lower_weights import lower_weights

__all__ = ["LOWERING_PIPELINE", "lower_for_export"]

LOWERING_PIPELINE = (
    Pass("lower_weights", lower_weights, "latent weights -> integer codes + DequantizeLinear (STE gone)"),
    Pass("lower_activations", lower_activations, "activation STE -> Q/DQ with typed zero points"),
    Pass("fold_batchnorm", fold_batchnorm, "BatchNorm into dequantization scales and biases"),
    Pass("cleanup", cleanup, "drop reads that lowering left unused"),
)


def lower_for_export(qm: GraphModule, fold_bn: bool = True) -> GraphModule:
    """An eval-mode copy of ``qm`` with STE ops lowered to export-form q/dq (``qm`` is untouched)."""
    lowered = copy.deepcopy(qm)
    lowered.eval()
    passes = [p for p in LOWERING_PIPELINE if fold_bn or p.name != "fold_batchnorm"]
    return PassManager(passes).run(lowered).graph_module
