"""Which weights stay in float because no quantization rule covers the op that reads them.

A weight the config asked to quantize but that feeds an op outside the op table (a parameter in
``torch.bmm``, a leaf module such as ``nn.RNN``) would otherwise stay in float without a word:
prepare warns, and :func:`qzo_fx.examine` lists them before anything changes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qzo_fx.quant.op_table import op_signature

__all__ = ["FloatWeight", "unquantized_weights"]

aten = torch.ops.aten
# Ops that multiply by a weight: a parameter of two or more dimensions in one of them is a weight.
_WEIGHT_OPS = {torch.einsum, torch.functional.einsum, torch.bmm, torch.baddbmm, torch.addmm, torch.mm, torch.matmul,
               operator.matmul, F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
               F.conv_transpose2d, F.conv_transpose3d, aten.einsum.default, aten.bmm.default, aten.baddbmm.default,
               aten.addmm.default, aten.mm.default, aten.matmul.default, aten.linear.default,
               aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
# Parameters these modules hold stay in float on purpose (norm affine terms).
_FLOAT_BY_DESIGN = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class FloatWeight:
    name: str      # the parameter (or the module holding it)
    op: str        # the op or module type that reads it
    node: str      # the graph node


def _parameter(gm: GraphModule, value: object):
    if not isinstance(value, Node) or value.op != "get_attr":
        return None
    try:
        return gm.get_parameter(str(value.target))
    except AttributeError:
        return None


def _reads_weight(gm: GraphModule, node: Node) -> list[str]:
    args = list(node.args) + [a for v in node.args if isinstance(v, (list, tuple)) for a in v]
    return [str(a.target) for a in args if (p := _parameter(gm, a)) is not None and p.dim() >= 2]


def unquantized_weights(gm: GraphModule) -> list[FloatWeight]:
    """Weights (parameters of two or more dimensions) read by ops that have no quantization rule."""
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHT_OPS and op_signature(node, modules) is None:
            label = getattr(node.target, "__name__", str(node.target))
            found += [FloatWeight(name, label, node.name) for name in _reads_weight(gm, node)]
        elif node.op == "call_module":
            module = modules.get(str(node.target))
            if module is None or isinstance(module, _FLOAT_BY_DESIGN):
                continue
            label = type(module).__name__
            if op_signature(node, modules) is not None:
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.Parameter):
                    continue
                # The deprecated torch.nn.utils.weight_norm / spectral_norm: a hook computes
                # ``weight`` from other parameters before each call, so there is none to quantize.
                label += " (its weight is computed by a forward hook, not a parameter)"
            if isinstance(module, GraphModule) or any(name.endswith("qzo_quant") for name, _ in module.named_modules()):
                continue  # a part prepared on its own (partial capture)
            if _has_weights(module):
                found.append(FloatWeight(str(node.target), label, node.name))
    return found


def _has_weights(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters())
