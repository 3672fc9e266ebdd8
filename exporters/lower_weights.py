"""Lower weights: ``fake_quant(weight)`` -> ``dequantize(integer codes)``.

The codes are computed once from the latent weights with the quantizer's own kernel, stored as
int8/uint8 buffers (int4 packing happens on the ONNX file), and the STE op disappears. The
result equals the eval-mode fake-quantized weight bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.context import QUANTIZER_KEY
from qzo_fx.exporters.export_context import EXPORT_CONTAINER, PACKABLE_KEY, export_container
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.integer_codes import code_quantizer, integer_codes
from qzo_fx.quant.quantizer import Quantizer, quantizer_of

__all__ = ["lower_weights", "storage_codes"]


def storage_codes(quantizer: Quantizer, codes: torch.Tensor) -> torch.Tensor:
    """Codes in their ONNX storage type: int8 for signed grids, uint8 for unsigned ones."""
    return codes.to(torch.int8 if quantizer.spec.qrange[0] < 0 else torch.uint8)


def _weight_codes(gm: GraphModule, node: Node):
    """``(name, quantizer, codes)`` for a weight fake_quant node or a code-mode dequantize node."""
    found = quantizer_of(gm, node)
    if found is not None and found[1].role == "weight" and node.args[0].op == "get_attr":
        return (*found, integer_codes(found[1], gm.get_parameter(str(node.args[0].target))))
    found = code_quantizer(gm, node)
    return None if found is None else (*found, found[1].codes)


def lower_weights(gm: GraphModule, *, ctx: object = None) -> PassResult:
    container = export_container(gm)
    packable = gm.meta.setdefault(PACKABLE_KEY, {})
    modified = False
    for node in list(gm.graph.nodes):
        found = _weight_codes(gm, node)
        if found is None:
            continue
        qname, quantizer, codes = found
        holder = nn.Module()
        holder.register_buffer("codes", storage_codes(quantizer, codes))
        holder.register_buffer("scale", quantizer.scale.detach().clone())
        zero = torch.zeros_like(quantizer.zero_point) if quantizer.is_sign else quantizer.zero_point.detach()
        holder.register_buffer("zero_point", zero.to(holder.codes.dtype))
        container.add_module(qname, holder)
        packable[f"{EXPORT_CONTAINER}.{qname}"] = (quantizer.spec.bits, holder.codes.dtype == torch.int8)
        axis = max(quantizer.axis, 0)
        with gm.graph.inserting_before(node):
            reads = [gm.graph.get_attr(f"{EXPORT_CONTAINER}.{qname}.{b}") for b in ("codes", "scale", "zero_point")]
            new = gm.graph.call_function(torch.ops.qzo.dequantize.default, (*reads, axis, quantizer.group_size))
        new.meta[QUANTIZER_KEY] = qname
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
