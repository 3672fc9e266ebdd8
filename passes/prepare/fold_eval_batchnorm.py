"""Compute the eval graph's BatchNorms folded, as the exported file does.

Export folds an eval-mode BatchNorm into the quantized conv or linear before it (weight scale
``s_w k``, bias ``B`` as int32 codes where an integer kernel adds it; see
:mod:`qzo_fx.passes.prepare.folded_batchnorm_ops`). This pass makes the eval graph compute that
same function with the same operations, so that the model, ``onnx.reference`` and ONNX Runtime
round the same values::

    y = bn(conv(x, fq(W), b))  ->  y = conv(x, folded_weight(fq(W), ...), folded_bias(b, ...))

The fold is recomputed at every call from the BatchNorm's parameters and running statistics and
from the quantizers' scales, so it follows training and re-calibration. The BatchNorm module (or
its functional call's buffers) stays in the model and its ``state_dict``; only the eval graph
stops calling it.

Only the eval graph changes: in train mode BatchNorm normalizes with batch statistics and nothing
is folded. A model whose two modes share one graph gets its own eval graph here. BatchNorms are
found however they were captured (:mod:`.batchnorm_site`); those after a float weight are left to
the exporter's plain fold.
"""
from __future__ import annotations

import copy
from typing import Optional

from torch.fx import GraphModule, Node

from qzo_fx.capture.modal import graph_of_mode
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.batchnorm_site import (
    BatchNormSite,
    batchnorm_site,
    folding_producer,
    producer_bias,
    set_producer_bias,
)
from qzo_fx.passes.prepare.folded_batchnorm_ops import folded_bias, folded_weight
from qzo_fx.quant.quantizer import Quantizer, quantizer_of

__all__ = ["fold_eval_batchnorm", "is_folded_site", "FoldedSite", "folded_site", "own_eval_graph"]

_WEIGHT, _BIAS = (op._opoverload for op in (folded_weight, folded_bias))


def _quantizer(gm: GraphModule, value: object) -> Optional[Quantizer]:
    found = quantizer_of(gm, value) if isinstance(value, Node) else None
    return None if found is None else found[1]


def _scales(gm: GraphModule, producer: Node) -> Optional[tuple[Node, Optional[Node], int]]:
    """``(weight scale read, input scale read or None, scale grid bits)`` when ``producer``'s weight
    is quantized per tensor or per output channel (what a fold into the scale takes); the input
    scale where the input is quantized per tensor too (an integer kernel, which rounds the bias)."""
    weight, x = producer.args[1], producer.args[0]
    w_q = _quantizer(gm, weight)
    if w_q is None or w_q.role != "weight" or w_q.is_sign or w_q.group_size or w_q.axis not in (0, -1):
        return None
    x_q = _quantizer(gm, x)
    integer = x_q is not None and x_q.role == "activation" and not x_q.is_sign and x_q.scale.dim() == 0
    return weight.args[1], x.args[1] if integer else None, w_q.spec.grid_bits


def _site(gm: GraphModule, node: Node) -> Optional[tuple[BatchNormSite, Node, Node, Optional[Node], int]]:
    site = batchnorm_site(gm, node)
    if site is None:
        return None
    producer = folding_producer(site)
    if producer is None:
        return None
    scales = _scales(gm, producer)
    return None if scales is None else (site, producer, *scales)


def _fold(gm: GraphModule, site: BatchNormSite, producer: Node, w_scale: Node, x_scale: Optional[Node],
          scale_bits: int) -> None:
    graph = gm.graph
    with graph.inserting_before(producer):
        mean, var, gamma, beta = site.reads(gm)
        scales = [None if read is None else graph.get_attr(str(read.target)) for read in (w_scale, x_scale)]
        weight = graph.call_function(_WEIGHT, (producer.args[1], scales[0], var, gamma, site.eps, scale_bits))
        bias = graph.call_function(_BIAS, (producer_bias(producer), mean, var, gamma, beta, site.eps, scales[1],
                                           scales[0], scale_bits))
    producer.update_arg(1, weight)
    set_producer_bias(producer, bias)
    site.replace_in_eval_graph(gm, producer, (weight, bias))


def is_folded_site(node: object) -> bool:
    """True for a conv/linear whose weight this pass folded."""
    return (isinstance(node, Node) and node.op == "call_function" and len(node.args) > 1
            and isinstance(node.args[1], Node) and node.args[1].target is _WEIGHT)


class FoldedSite:
    """The nodes of one folded site: ``producer(x, folded_weight(...), folded_bias(...))``."""

    def __init__(self, producer: Node) -> None:
        self.producer, self.weight, self.bias = producer, producer.args[1], producer_bias(producer)

    def rewire(self, weight: Node, bias: object) -> None:
        """Give the producer ``weight`` and ``bias`` in place of the folding ops."""
        self.producer.update_arg(1, weight)
        set_producer_bias(self.producer, bias)


def folded_site(node: Node) -> Optional[FoldedSite]:
    """The site ``node`` is, when it is a conv/linear this pass folded."""
    return FoldedSite(node) if is_folded_site(node) else None


def own_eval_graph(gm: GraphModule) -> None:
    """Give the eval mode a graph of its own where both modes share one."""
    graphs = gm.qzo_mode_graphs
    if graphs[True] is graphs[False]:
        graphs[False] = copy.deepcopy(graphs[True])


def fold_eval_batchnorm(gm: GraphModule, *, ctx: object = None) -> PassResult:
    """Compute the eval graph's foldable BatchNorms folded, as the exported file (see the module).

    Example:
        >>> import torch, qzo_fx
        >>> from qzo_fx.passes.prepare.fold_eval_batchnorm import is_folded_site
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> qm = qzo_fx.prepare(m, qzo_fx.QuantConfig(activation_bits=8), example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> sum(is_folded_site(n) for n in qm.qzo_mode_graphs[False].nodes)
        1
    """
    if not hasattr(gm, "qzo_mode_graphs"):
        return PassResult(gm, False)  # one graph for both modes: nothing is eval-only
    with graph_of_mode(gm, False):
        if not any(_site(gm, node) is not None for node in gm.graph.nodes):
            return PassResult(gm, False)
    own_eval_graph(gm)
    with graph_of_mode(gm, False):
        for site in [site for node in gm.graph.nodes if (site := _site(gm, node)) is not None]:
            _fold(gm, *site)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, True)
