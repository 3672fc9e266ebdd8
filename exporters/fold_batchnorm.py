"""Fold eval-mode BatchNorm into the preceding conv/linear.

``BN(conv(x, (q - z) s) + b) = conv(x, (q - z) (s k)) + (b - mu) k + beta`` with
``k = gamma / sqrt(var + eps)``: the integer codes stay as trained and ``k`` goes into the
dequantization scale, multiplied, never divided by gamma (timm zero-initialises some gammas).

After a quantized weight the eval graph already computes this fold
(:mod:`qzo_fx.passes.prepare.fold_eval_batchnorm`): the conv reads ``folded_weight(...)`` and
``folded_bias(...)``, and here they become the codes' DequantizeLinear with the scale ``s k`` and
the bias the graph computed (int32 codes where it rounds them). Where some ``k <= 0`` (a negative
or zero scale) the weight is ``DequantizeLinear(q) * k`` and the bias float, the graph's
operations again. After a float weight the BatchNorm folds directly into a scaled weight and a
float bias.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qzo_fx.exporters.export_context import EXPORT_CONTAINER, export_container
from qzo_fx.exporters.lower_bias import constant_value, int32_bias
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.batchnorm_site import (
    BatchNormSite,
    batchnorm_site,
    folding_producer,
    producer_bias,
    set_producer_bias,
)
from qzo_fx.passes.prepare.fold_eval_batchnorm import FoldedSite, folded_site
from qzo_fx.passes.prepare.folded_batchnorm_ops import (
    batchnorm_scale,
    foldable,
    folded_bias_parts,
    folded_weight_scale,
)

__all__ = ["fold_batchnorm"]


def _constant(gm: GraphModule, value: object) -> object:
    found = constant_value(gm, value)
    return found.detach() if isinstance(found, torch.Tensor) else found


def _scale_dequantize(gm: GraphModule, dequantize: Node, k: torch.Tensor) -> None:
    """Multiply the scale a ``qzo.dequantize`` node reads by ``k`` (per output channel)."""
    scale_target = str(dequantize.args[1].target)
    scale = gm.get_buffer(scale_target)
    owner, _, name = scale_target.rpartition(".")
    gm.get_submodule(owner).register_buffer(name, folded_weight_scale(scale, k).contiguous())
    if scale.dim() == 0:
        # A per-tensor scale times k is per channel; a per-channel zero point must follow.
        zero_target = str(dequantize.args[2].target)
        zero = gm.get_buffer(zero_target)
        z_owner, _, z_name = zero_target.rpartition(".")
        gm.get_submodule(z_owner).register_buffer(z_name, zero.expand(k.shape).contiguous())
        dequantize.update_arg(3, 0)


def _buffer_read(gm: GraphModule, value: torch.Tensor, name: str, before: Node) -> Node:
    """A ``get_attr`` of ``value``, stored as ``qzo_export.<name>``, inserted before ``before``."""
    gm.get_submodule(EXPORT_CONTAINER).register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}")


def _fold_site(gm: GraphModule, site: FoldedSite) -> None:
    weight_in, _, var, gamma, eps = site.weight.args
    k = batchnorm_scale(_constant(gm, var), _constant(gm, gamma), eps)
    bias, mean, _, _, beta, _, input_scale, weight_scale = [_constant(gm, a) for a in site.bias.args]
    tag = site.producer.name + "_folded"
    if foldable(k):  # into the codes' scale, the bias on the int32 grid where the graph rounds it
        _scale_dequantize(gm, weight_in, k)
        value, step = folded_bias_parts(bias, mean, k, beta, input_scale, weight_scale)
        rounded = step is not None
        new_bias = int32_bias(gm, f"{tag}_bias", value, step, before=site.producer) if rounded else \
            _buffer_read(gm, value, f"{tag}_bias", site.producer)
        site.rewire(weight_in, new_bias)
    else:  # some k <= 0 (no negative scales): w k after the DequantizeLinear, a float bias, as the graph
        rank = _constant(gm, weight_in.args[0]).dim()
        k_read = _buffer_read(gm, k.reshape((-1,) + (1,) * (rank - 1)), f"{tag}_k", site.producer)
        with gm.graph.inserting_before(site.producer):
            scaled = gm.graph.call_function(torch.mul, (weight_in, k_read))
        value, _ = folded_bias_parts(bias, mean, k, beta, None, None)
        site.rewire(scaled, _buffer_read(gm, value, f"{tag}_bias", site.producer))
    for node in (site.weight, site.bias):
        if not node.users:
            gm.graph.erase_node(node)


def _float_weight_site(gm: GraphModule, node: Node) -> BatchNormSite | None:
    """A BatchNorm after a float weight (the eval graph left it unfolded)."""
    site = batchnorm_site(gm, node)
    if site is None or (node.op == "call_module" and gm.get_submodule(str(node.target)).training):
        return None
    producer = folding_producer(site)
    return site if producer is not None and producer.args[1].op == "get_attr" else None


def _fold_float_weight(gm: GraphModule, site: BatchNormSite) -> None:
    producer, tag = site.input, site.tag + "_folded"
    mean, var, gamma, beta = [None if t is None else t.detach() for t in site.tensors(gm)]
    k = batchnorm_scale(var, gamma, site.eps)
    w = operator.attrgetter(str(producer.args[1].target))(gm).detach()
    bias = producer_bias(producer)
    value, _ = folded_bias_parts(_constant(gm, bias) if isinstance(bias, Node) else None, mean, k, beta, None, None)
    producer.update_arg(1, _buffer_read(gm, w * k.reshape((-1,) + (1,) * (w.dim() - 1)), f"{tag}_weight", producer))
    set_producer_bias(producer, _buffer_read(gm, value, f"{tag}_bias", producer))
    site.node.replace_all_uses_with(producer)
    gm.graph.erase_node(site.node)


def fold_batchnorm(gm: GraphModule, *, ctx: object = None) -> PassResult:
    export_container(gm)
    modified = False
    for node in list(gm.graph.nodes):
        site = folded_site(node)
        if site is not None:
            _fold_site(gm, site)
            modified = True
            continue
        plain = _float_weight_site(gm, node)
        if plain is not None:
            _fold_float_weight(gm, plain)
            modified = True
    return PassResult(gm, modified)
