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

A weight can reach several folded sites: a shared encoder called on two views (SimCLR), or one conv
before two BatchNorms. Each site gets a DequantizeLinear of its own scale (and codes, where a scale
grid refolds them), so no site's ``k`` lands in another's; sites of one weight and one BatchNorm
share theirs.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.exporters.export_context import EXPORT_CONTAINER, PACKABLE_KEY, export_container
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
    refolded_codes,
)
from qzo_fx.quant.ops import expand_param

__all__ = ["fold_batchnorm"]


def _constant(gm: GraphModule, value: object) -> object:
    found = constant_value(gm, value)
    return found.detach() if isinstance(found, torch.Tensor) else found


def _set_buffer(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    gm.get_submodule(owner).register_buffer(name, value.contiguous())


def _scale_dequantize(gm: GraphModule, dequantize: Node, k: torch.Tensor, scale_bits: int) -> None:
    """Give a ``qzo.dequantize`` node the folded scale (per output channel), ``s k`` or its grid
    value, and with a grid the codes refolded onto it, as the eval graph's ``folded_weight``."""
    codes_target, scale_target, zero_target = (str(a.target) for a in dequantize.args[:3])
    scale, zero = gm.get_buffer(scale_target), gm.get_buffer(zero_target)
    if scale_bits:
        codes = gm.get_buffer(codes_target)
        offset = zero.float() if zero.dim() == 0 else expand_param(zero.float(), codes, 0, 0)
        refolded = refolded_codes(codes.float() - offset, scale, k, scale_bits) + offset
        _set_buffer(gm, codes_target, refolded.to(codes.dtype))
    _set_buffer(gm, scale_target, folded_weight_scale(scale, k, scale_bits))
    if scale.dim() == 0:
        # A per-tensor scale times k is per channel; a per-channel zero point must follow.
        _set_buffer(gm, zero_target, zero.expand(k.shape))
        dequantize.update_arg(3, 0)


def _site_dequantize(gm: GraphModule, dequantize: Node, tag: str, before: Node, copy_codes: bool) -> Node:
    """A copy of the ``qzo.dequantize`` node ``dequantize`` reading scale and zero point buffers
    of its own (and codes, with ``copy_codes``), for one folded site to scale. The buffers sit in a
    holder of their own beside the weight's, packed to INT4 as the weight's codes are."""
    source = str(dequantize.args[0].target).rpartition(".")[0]  # qzo_export.<weight quantizer>
    name = f"{source.rpartition('.')[2]}_{tag}"
    holder = nn.Module()
    export_container(gm).add_module(name, holder)
    packable = gm.meta.setdefault(PACKABLE_KEY, {})
    if source in packable:
        packable[f"{EXPORT_CONTAINER}.{name}"] = packable[source]
    reads = []
    for read, part in zip(dequantize.args[:3], ("codes", "scale", "zero_point")):
        target = str(read.target)
        if part != "codes" or copy_codes:
            holder.register_buffer(part, gm.get_buffer(target).clone())
            target = f"{EXPORT_CONTAINER}.{name}.{part}"
        with gm.graph.inserting_before(before):
            reads.append(gm.graph.get_attr(target))
    with gm.graph.inserting_before(before):
        copy = gm.graph.call_function(dequantize.target, (*reads, *dequantize.args[3:]), dict(dequantize.kwargs))
    copy.meta = dict(dequantize.meta)
    return copy


def _read_key(value: object) -> object:
    return str(value.target) if isinstance(value, Node) and value.op == "get_attr" else value


def _buffer_read(gm: GraphModule, value: torch.Tensor, name: str, before: Node) -> Node:
    """A ``get_attr`` of ``value``, stored as ``qzo_export.<name>``, inserted before ``before``."""
    gm.get_submodule(EXPORT_CONTAINER).register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}")


def _fold_site(gm: GraphModule, site: FoldedSite, scaled: dict[tuple, Node]) -> None:
    """Fold one site; ``scaled``: the dequantizations already scaled, by weight and BatchNorm."""
    weight_in, _, var, gamma, eps = site.weight.args[:5]
    scale_bits = site.weight.args[5] if len(site.weight.args) > 5 else 0
    k = batchnorm_scale(_constant(gm, var), _constant(gm, gamma), eps)
    bias, mean, _, _, beta, _, input_scale, weight_scale = [_constant(gm, a) for a in site.bias.args[:8]]
    tag = site.producer.name + "_folded"
    if foldable(k):  # into the codes' scale, the bias on the int32 grid where the graph rounds it
        key = (*(_read_key(a) for a in weight_in.args[:3]), _read_key(var), _read_key(gamma), eps)
        if key not in scaled:
            scaled[key] = _site_dequantize(gm, weight_in, tag, site.producer, copy_codes=bool(scale_bits))
            _scale_dequantize(gm, scaled[key], k, scale_bits)
        dequantized = scaled[key]
        value, step = folded_bias_parts(bias, mean, k, beta, input_scale, weight_scale, scale_bits)
        rounded = step is not None
        new_bias = int32_bias(gm, f"{tag}_bias", value, step, before=site.producer) if rounded else \
            _buffer_read(gm, value, f"{tag}_bias", site.producer)
        site.rewire(dequantized, new_bias)
    else:  # some k <= 0 (no negative scales): w k after the DequantizeLinear, a float bias, as the graph
        rank = _constant(gm, weight_in.args[0]).dim()
        k_read = _buffer_read(gm, k.reshape((-1,) + (1,) * (rank - 1)), f"{tag}_k", site.producer)
        with gm.graph.inserting_before(site.producer):
            scaled = gm.graph.call_function(torch.mul, (weight_in, k_read))
        value, _ = folded_bias_parts(bias, mean, k, beta, None, None)
        site.rewire(scaled, _buffer_read(gm, value, f"{tag}_bias", site.producer))
    for node in (site.weight, site.bias, weight_in):
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
    modified, scaled = False, {}
    for node in list(gm.graph.nodes):
        site = folded_site(node)
        if site is not None:
            _fold_site(gm, site, scaled)
            modified = True
            continue
        plain = _float_weight_site(gm, node)
        if plain is not None:
            _fold_float_weight(gm, plain)
            modified = True
    return PassResult(gm, modified)
