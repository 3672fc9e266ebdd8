"""Switch weights between latent floats and integer codes.

Both rewrite the graph of every mode of a prepared model. ``use_integer_codes``: every weight
``fake_quant(W)`` becomes ``dequantize(codes)`` with the codes in an int16 buffer of its
quantizer; the latent float parameter is deleted (under every name that aliases it), so nothing
but the grid remains. ``use_latent_weights`` goes back: the parameter is
recreated from the dequantized codes (exactly on the grid) and the STE op returns.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.capture.modal import distinct_modes, graph_of_mode
from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.ops import expand_param, grid_codes
from qzo_fx.quant.quantizer import Quantizer, quantizer_of, quantizer_read

__all__ = ["use_integer_codes", "use_latent_weights", "integer_codes", "code_quantizer"]


def integer_codes(quantizer: Quantizer, weight: torch.Tensor) -> torch.Tensor:
    """The grid integers of ``weight`` (what ``fake_quant`` rounds it to), as int16."""
    with torch.no_grad():
        if quantizer.is_sign:
            return torch.where(weight >= 0, 1, -1).to(torch.int16)
        qmin, qmax = quantizer.spec.qrange
        s = quantizer.step_size(weight)
        z = expand_param(quantizer.zero_point.detach(), weight, quantizer.axis, quantizer.group_size)
        return grid_codes(weight, s, z, qmin, qmax).to(torch.int16)


def _aliases(gm: nn.Module, param: nn.Parameter) -> list[str]:
    return [name for name, p in gm.named_parameters(remove_duplicate=False) if p is param]


def _delete(gm: nn.Module, name: str) -> None:
    owner, _, attr = name.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, attr)


def _rewrite_every_mode(gm: GraphModule, rewrite, touched: dict[str, Quantizer]) -> bool:
    """``rewrite(gm, touched)`` on the graph of each distinct mode, then drop the reads it left."""
    modified = False
    for training in distinct_modes(gm):
        with graph_of_mode(gm, training):
            modified |= rewrite(gm, touched)
            _drop_dangling_reads(gm)
            gm.recompile()
    return modified


def use_integer_codes(gm: GraphModule, *, ctx: object = None) -> PassResult:
    """On the graph of every mode; the latent parameters go once no graph reads them."""
    converted: dict[str, Quantizer] = {}
    modified = _rewrite_every_mode(gm, _read_codes, converted)
    for quantizer in converted.values():
        for name in quantizer.latent_names:
            _delete(gm, name)
    return PassResult(gm, modified)


def _read_codes(gm: GraphModule, converted: dict[str, Quantizer]) -> bool:
    modified = False
    for node in list(gm.graph.nodes):
        found = quantizer_of(gm, node)
        if found is None or found[1].role != "weight" or node.args[0].op != "get_attr":
            continue
        qname, quantizer = found
        if qname not in converted:  # the first graph that reads it: codes from the latent weight
            param = gm.get_parameter(str(node.args[0].target))
            quantizer.register_buffer("codes", integer_codes(quantizer, param))
            quantizer.latent_names = _aliases(gm, param)
            quantizer.latent_requires_grad = param.requires_grad
            converted[qname] = quantizer
        prefix = f"{QUANT_CONTAINER}.{qname}"
        with gm.graph.inserting_before(node):
            codes = gm.graph.get_attr(f"{prefix}.codes")
            zero = gm.graph.get_attr(f"{prefix}.zero_point")
            new = gm.graph.call_function(torch.ops.qzo.dequantize.default,
                                         (codes, node.args[1], zero, max(quantizer.axis, 0), quantizer.group_size))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return modified


def code_quantizer(gm: nn.Module, node: Node):
    """``(name, quantizer)`` of a ``qzo.dequantize`` node reading a quantizer's codes, else None."""
    if node.op != "call_function" or node.target is not torch.ops.qzo.dequantize.default:
        return None
    found = quantizer_read(gm, node.args[0])
    return None if found is None or found[2] != "codes" else found[:2]


def use_latent_weights(gm: GraphModule, *, ctx: object = None) -> PassResult:
    """On the graph of every mode; the codes go once no graph reads them."""
    restored: dict[str, Quantizer] = {}
    modified = _rewrite_every_mode(gm, _read_latent, restored)
    for quantizer in restored.values():
        del quantizer.codes
    return PassResult(gm, modified)


def _read_latent(gm: GraphModule, restored: dict[str, Quantizer]) -> bool:
    modified = False
    for node in list(gm.graph.nodes):
        found = code_quantizer(gm, node)
        if found is None:
            continue
        qname, quantizer = found
        if qname not in restored:  # the first graph that reads it: the parameter from the codes
            with torch.no_grad():
                values = torch.ops.qzo.dequantize.default(quantizer.codes, quantizer.scale.detach(),
                                                          quantizer.zero_point, max(quantizer.axis, 0),
                                                          quantizer.group_size)
            param = nn.Parameter(values, requires_grad=getattr(quantizer, "latent_requires_grad", True))
            for name in quantizer.latent_names:
                owner, _, attr = name.rpartition(".")
                setattr(gm.get_submodule(owner) if owner else gm, attr, param)
            restored[qname] = quantizer
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(quantizer.latent_names[0])
            if quantizer.is_sign:
                new = gm.graph.call_function(torch.ops.qzo.fake_sign.default,
                                             (weight, node.args[1], quantizer.axis, quantizer.group_size,
                                              quantizer.spec.ste))
            else:
                qmin, qmax = quantizer.spec.qrange
                zero = gm.graph.get_attr(f"{QUANT_CONTAINER}.{qname}.zero_point")
                new = gm.graph.call_function(torch.ops.qzo.fake_quant.default,
                                             (weight, node.args[1], zero, qmin, qmax, quantizer.axis,
                                              quantizer.group_size, quantizer.spec.ste))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return modified


def _drop_dangling_reads(gm: GraphModule) -> None:
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
