"""Lower quantized biases: ``fake_quant(b, s_x * s_w, int32 grid)`` -> ``dequantize(int32 codes)``.

The prepare pass :mod:`qzo_fx.passes.prepare.quantize_bias` rounds the bias of integer-kernel
ops to int32 at ``s_x * s_w``. Here that rounding becomes an int32 initializer feeding a
DequantizeLinear with the same scale, the layout ONNX Runtime's QLinearConv / QGemm fusions
take as it is (no float bias left for the runtime to round again), and one that float runtimes
read as the same bias the model trained with.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.errors import ExportError
from qzo_fx.exporters.export_context import EXPORT_CONTAINER, export_container
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.quantize_bias import BIAS_QRANGE, is_bias_fake_quant
from qzo_fx.quant.ops import grid_codes

__all__ = ["lower_bias", "constant_value", "int32_bias"]


def constant_value(gm: GraphModule, node: object) -> object:
    """The value of a graph expression over attributes only (``get_attr`` and pure calls)."""
    if not isinstance(node, Node):
        return node
    if node.op == "get_attr":
        owner, _, name = str(node.target).rpartition(".")
        return getattr(gm.get_submodule(owner) if owner else gm, name)
    if node.op == "call_function":
        args = [constant_value(gm, a) for a in node.args]
        kwargs = {k: constant_value(gm, v) for k, v in node.kwargs.items()}
        return node.target(*args, **kwargs)
    raise ExportError(f"node {node.name} ({node.op}) is not a constant expression: cannot store it in the file.")


def int32_bias(gm: GraphModule, name: str, value: torch.Tensor, scale: torch.Tensor, *, before: Node,
               codes: Optional[torch.Tensor] = None, axis: int = 0) -> Node:
    """A ``dequantize(int32 codes, scale)`` node reading ``qzo_export.<name>``: ``value`` rounded to
    the int32 grid at ``scale`` (or the given ``codes``), inserted before ``before``.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> bias = int32_bias(gm, "b", torch.tensor([0.26, -0.5]), torch.tensor([0.1, 0.1]),
        ...                   before=gm.graph.output_node())
        >>> gm.qzo_export.b.codes.tolist()
        [3, -5]
    """
    if codes is None:
        codes = grid_codes(value, scale, torch.zeros_like(scale), *BIAS_QRANGE).to(torch.int32)
    holder = nn.Module()
    holder.register_buffer("codes", codes)
    holder.register_buffer("scale", scale)
    holder.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int32))
    export_container(gm).add_module(name, holder)
    with gm.graph.inserting_before(before):
        reads = [gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}.{b}") for b in ("codes", "scale", "zero_point")]
        return gm.graph.call_function(torch.ops.qzo.dequantize.default, (*reads, axis, 0))


def lower_bias(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if not is_bias_fake_quant(node):
            continue
        bias, scale_node, _, qmin, qmax, axis = node.args[:6]
        with torch.no_grad():
            value = constant_value(gm, bias).detach()
            scale = constant_value(gm, scale_node).detach().clone().contiguous()
            s = scale.reshape(-1) if scale.dim() else scale
            codes = grid_codes(value, s, torch.zeros_like(s), qmin, qmax).to(torch.int32)
        new = int32_bias(gm, f"{node.name}_bias", value, scale, before=node, codes=codes, axis=max(axis, 0))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
