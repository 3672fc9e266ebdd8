"""The export lowering pipeline: a copy of the prepared model in its inference form."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.capture.copying import copy_model
from qzo_fx.capture.modes import set_mode
from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.exporters.attention_4d import attention_4d
from qzo_fx.exporters.export_context import PACKABLE_KEY
from qzo_fx.exporters.fold_batchnorm import fold_batchnorm
from qzo_fx.exporters.gather_quantized import lower_quantized_gather
from qzo_fx.exporters.lower_activations import lower_activations
from qzo_fx.exporters.lower_bias import lower_bias
from qzo_fx.exporters.lower_folding_ops import lower_folding_ops
from qzo_fx.exporters.lower_weights import lower_weights
from qzo_fx.exporters.matmul_nbits import lower_matmul_nbits
from qzo_fx.pass_infra import Pass, PassManager
from qzo_fx.passes.prepare.cleanup import cleanup

__all__ = ["LOWERING_PIPELINE", "LoweringOptions", "lower_for_export", "lowered_meta"]

LOWERING_PIPELINE = (
    Pass("lower_bias", lower_bias, "int32-rounded biases -> int32 codes + DequantizeLinear"),
    Pass("lower_weights", lower_weights, "latent weights -> integer codes + DequantizeLinear (STE gone)"),
    Pass("lower_activations", lower_activations, "activation STE -> Q/DQ with typed zero points"),
    Pass("fold_batchnorm", fold_batchnorm, "BatchNorm into dequantization scales and biases (as the eval graph)"),
    Pass("lower_folding_ops", lower_folding_ops, "BatchNorm-folding ops of sites not folded: plain ops"),
    Pass("lower_matmul_nbits", lower_matmul_nbits, "blocked 2/4/8-bit linears -> ORT MatMulNBits (ORT formats)"),
    Pass("lower_quantized_gather", lower_quantized_gather, "embeddings gather codes, dequantize only those rows"),
    Pass("attention_4d", attention_4d, "attention over 5-D and wider inputs with its leading dims folded"),
    Pass("cleanup", cleanup, "drop reads that lowering left unused"),
)


@dataclass(frozen=True)
class LoweringOptions:
    """What the lowering passes read. ``ort_contrib_ops``: the file is for ONNX Runtime, so blocked
    weights may use its com.microsoft kernels (MatMulNBits, GatherBlockQuantized)."""

    ort_contrib_ops: bool = False


def lower_for_export(qm: nn.Module, fold_bn: bool = True, ort_contrib_ops: bool = False) -> nn.Module:
    """An eval-mode copy of ``qm`` with STE ops lowered to export-form q/dq (``qm`` is untouched).
    Every prepared part is lowered: the root, or each part of a partially captured model.
    ``ort_contrib_ops``: blocked weights of linears, matmuls and embeddings as ONNX Runtime's
    MatMulNBits / GatherBlockQuantized."""
    lowered = copy_model(qm)
    set_mode(lowered, False)
    options = LoweringOptions(ort_contrib_ops)
    passes = [p for p in LOWERING_PIPELINE if fold_bn or p.name != "fold_batchnorm"]
    for prefix, _ in quantizer_containers(lowered):
        part = lowered.get_submodule(prefix) if prefix else lowered
        PassManager(passes).run(part, options)
        if prefix:  # packing info of parts, under root-relative names
            for key, value in part.meta.get(PACKABLE_KEY, {}).items():
                lowered_meta(lowered).setdefault(PACKABLE_KEY, {})[f"{prefix}.{key}"] = value
    return lowered


def lowered_meta(module: nn.Module) -> dict:
    """``gm.meta`` for a GraphModule; an attribute dict for an eager root."""
    if isinstance(module, GraphModule):
        return module.meta
    if not hasattr(module, "qzo_meta"):
        module.qzo_meta = {}
    return module.qzo_meta
