"""Lower quantized biases: ``fake_quant(b, s_x * s_w, int32 grid)`` -> ``dequantize(int32 codes)``.

The prepare pass :mod:`qzo_fx.passes.prepare.quantize_bias` rounds the bias of integer-kernel
ops to int32 at ``s_x * s_w``. Here that rounding becomes an int32 initializer feeding a
DequantizeLinear with the same scale, the layout ONNX Runtime's QLinearConv / QGemm fusions
take as it is (no float bias left for the runtime to round again), and one that float runtimes
read as the same bias the model trained with.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from qzo_fx.exporters.export_context import EXPORT_CONTAINER, export_container
from qzo_fx.passes.prepare.quantize_bias import is_bias_fake_quant
from torch.fx import GraphModule, Node

from qzo_fx.errors import ExportError
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.ops import grid_codes

__all__ = ["lower_bias", "constant_value"]


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


def lower_bias(gm: GraphModule, *, ctx: object = None) -> PassResult:
    container, modified = export_container(gm), False
    for node in list(gm.graph.nodes):
        if not is_bias_fake_quant(node):
            continue
        bias, scale_node, _, qmin, qmax, axis = node.args[:6]
        with torch.no_grad():
            value = constant_value(gm, bias).detach()
            scale = constant_value(gm, scale_node).detach().clone().contiguous()
            s = scale.reshape(-1) if scale.dim() else scale
            codes = grid_codes(value, s, torch.zeros_like(s), qmin, qmax).to(torch.int32)
        holder = nn.Module()
        holder.register_buffer("codes", codes)
        holder.register_buffer("scale", scale)
        holder.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int32))
        name = f"{node.name}_bias"
        container.add_module(name, holder)
        with gm.graph.inserting_before(node):
            reads = [gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}.{b}") for b in ("codes", "scale", "zero_point")]
            new = gm.graph.call_function(torch.ops.qzo.dequantize.default, (*reads, max(axis, 0), 0))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
