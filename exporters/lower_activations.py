"""Lower activations: ``fake_quant(x)`` -> ``quantize_dequantize(x)`` with a typed zero point.

The zero point's dtype (int8 for signed grids, uint8 for unsigned) becomes the ONNX storage type
of the QuantizeLinear output; scales stay 0-d (ORT's fusions refuse 1-element vectors).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import GraphModule

import qzo_fx.exporters.ops  # noqa: F401  (registers qzo.quantize_dequantize)
from qzo_fx.context import QUANTIZER_KEY
from qzo_fx.exporters.export_context import EXPORT_CONTAINER, export_container
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.quantizer import quantizer_of

__all__ = ["lower_activations"]


def lower_activations(gm: GraphModule, *, ctx: object = None) -> PassResult:
    container, modified = export_container(gm), False
    for node in list(gm.graph.nodes):
        found = quantizer_of(gm, node)
        if found is None or found[1].role != "activation":
            continue
        qname, quantizer = found
        holder = nn.Module()
        holder.register_buffer("scale", quantizer.scale.detach().clone().reshape(()))
        qmin, qmax = quantizer.spec.qrange
        holder.register_buffer("zero_point", quantizer.zero_point.detach().reshape(()).to(
            torch.int8 if qmin < 0 else torch.uint8))
        container.add_module(qname, holder)
        with gm.graph.inserting_before(node):
            scale = gm.graph.get_attr(f"{EXPORT_CONTAINER}.{qname}.scale")
            if quantizer.is_sign:
                new = gm.graph.call_function(torch.ops.qzo.sign_dequantize.default, (node.args[0], scale))
            else:
                zero = gm.graph.get_attr(f"{EXPORT_CONTAINER}.{qname}.zero_point")
                new = gm.graph.call_function(torch.ops.qzo.quantize_dequantize.default,
                                             (node.args[0], scale, zero, qmin, qmax))
        new.meta[QUANTIZER_KEY] = qname
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
