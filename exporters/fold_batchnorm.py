"""Fold eval-mode BatchNorm into the preceding conv/linear.

``BN(conv(x, (q - z) s) + b) = conv(x, (q - z) (s k)) + (b - mu) k + beta`` with
``k = gamma / sqrt(var + eps)``: the integer codes stay as trained and ``k`` goes into the
dequantization scale, multiplied, never divided by gamma (timm zero-initialises some gammas).
Channels with ``k <= 0`` would need negative scales, so such a BatchNorm is left in place.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.exporters.export_context import EXPORT_CONTAINER, export_container
from qzo_fx.exporters.lower_bias import constant_value, int32_bias
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.round_folded_bias import (
    FOLDABLE_BATCHNORMS,
    FOLDABLE_PRODUCERS,
    folded_bias,
    is_folded_bias_rounding,
)

__all__ = ["fold_batchnorm"]


def _foldable(gm: GraphModule, bn_node: Node):
    if bn_node.op != "call_module":
        return None
    bn = gm.get_submodule(str(bn_node.target))
    # Exact types only: subclasses (timm's BatchNormAct2d) add an activation a fold would drop.
    if type(bn) not in FOLDABLE_BATCHNORMS or bn.training or bn.running_mean is None:
        return None
    producer = bn_node.args[0]
    if not isinstance(producer, Node) or producer.target not in FOLDABLE_PRODUCERS or len(producer.users) != 1:
        return None
    weight = producer.args[1]
    k = (bn.weight.detach() if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    if weight.op == "call_function" and weight.target is torch.ops.qzo.dequantize.default:
        scale = gm.get_buffer(str(weight.args[1].target))
        if (k <= 0).any() or (scale.dim() > 0 and weight.args[3] != 0):
            return None  # negative scales, or scales not along output channels
    elif weight.op != "get_attr":
        return None
    return bn, producer, weight, k


def _fold(gm: GraphModule, bn: nn.Module, producer: Node, weight: Node, k: torch.Tensor, rounding: Optional[Node],
          tag: str) -> None:
    if weight.op == "get_attr":  # a float weight: scale it directly (a new buffer; nothing shared changes)
        w = operator.attrgetter(str(weight.target))(gm)
        shape = (-1,) + (1,) * (w.dim() - 1)
        gm.get_submodule(EXPORT_CONTAINER).register_buffer(f"{tag}_weight", w.detach() * k.reshape(shape))
        with gm.graph.inserting_before(producer):
            producer.update_arg(1, gm.graph.get_attr(f"{EXPORT_CONTAINER}.{tag}_weight"))
    else:
        scale_target = str(weight.args[1].target)
        scale = gm.get_buffer(scale_target)
        folded = scale * k.reshape((-1,) + (1,) * max(scale.dim() - 1, 0)) if scale.dim() else scale * k
        owner, _, name = scale_target.rpartition(".")
        gm.get_submodule(owner).register_buffer(name, folded.contiguous())
        if scale.dim() == 0:
            # A per-tensor scale times k is per channel; a per-channel zero point must follow.
            zero_target = str(weight.args[2].target)
            zero = gm.get_buffer(zero_target)
            z_owner, _, z_name = zero_target.rpartition(".")
            gm.get_submodule(z_owner).register_buffer(z_name, zero.expand(k.shape).contiguous())
            weight.update_arg(3, 0)
    _set_bias(producer, _folded_bias_node(gm, bn, producer, k, rounding, tag))


def _folded_bias_node(gm: GraphModule, bn: nn.Module, producer: Node, k: torch.Tensor, rounding: Optional[Node],
                      tag: str) -> Node:
    """The folded bias ``(b - mean) k + beta``: int32 codes + DequantizeLinear at ``s_x * s_w * k``
    where the eval graph rounds it (an integer kernel adds it so), else a float initializer."""
    bias = producer.args[2] if len(producer.args) > 2 else None
    # A float parameter, or an int32 bias already lowered to dequantize(codes): its value either way.
    if rounding is None:
        b = constant_value(gm, bias).detach() if isinstance(bias, Node) else torch.zeros_like(k)
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(k)
        gm.get_submodule(EXPORT_CONTAINER).register_buffer(f"{tag}_bias", (b - bn.running_mean) * k + shift)
        with gm.graph.inserting_before(producer):
            return gm.graph.get_attr(f"{EXPORT_CONTAINER}.{tag}_bias")
    # The values the eval graph rounds, from the same reads (the quantizers' scales included).
    reads = [constant_value(gm, a) for a in rounding.args[1:]]
    with torch.no_grad():
        value, step, _ = folded_bias(*[r.detach() if isinstance(r, torch.Tensor) else r for r in reads])
    return int32_bias(gm, f"{tag}_bias", value, step, before=producer)


def _set_bias(producer: Node, bias: Node) -> None:
    args = list(producer.args) + [None] * (3 - len(producer.args))
    args[2] = bias
    producer.args = tuple(args)


def _rounding_of(bn_node: Node) -> Optional[Node]:
    """The eval graph's int32 rounding of this BatchNorm's folded bias, if it has one."""
    return next((user for user in bn_node.users if is_folded_bias_rounding(user) and user.args[0] is bn_node), None)


def fold_batchnorm(gm: GraphModule, *, ctx: object = None) -> PassResult:
    export_container(gm)
    modified = False
    for node in list(gm.graph.nodes):
        match = _foldable(gm, node)
        if match is None:
            continue
        bn, producer, weight, k = match
        rounding = _rounding_of(node)
        _fold(gm, bn, producer, weight, k.detach(), rounding, tag=str(node.target).replace(".", "_") + "_folded")
        if rounding is not None:  # now in the bias codes
            rounding.replace_all_uses_with(producer)
            gm.graph.erase_node(rounding)
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
