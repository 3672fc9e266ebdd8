"""Compute the eval graph's remaining BatchNorms as one multiply and one add per element.

A BatchNorm that follows no conv or linear (DenseNet's and pre-activation ResNets' norm after a
concat, a norm after a pool) has nothing to fold into, so the file keeps it. torch's BatchNorm
kernel and ONNX Runtime's compute ``(x - mean) / sqrt(var + eps) * gamma + beta`` in their own
orders, and the output differs in its last bits; where a quantizer follows, a value within that
distance of a rounding boundary takes a neighbouring code. Written as ``x * k + (beta - mean * k)``
with ``k = gamma / sqrt(var + eps)``, every step is one IEEE operation (sqrt, divide, multiply,
subtract, add), which torch, ``onnx.reference`` and ONNX Runtime round alike; with the scales of
``QuantConfig.exact_scales`` the input is exact too, so all three pick the same codes::

    y = batch_norm(x, mean, var, gamma, beta)  ->  y = batchnorm_affine(x, mean, var, gamma, beta)

Only the eval graph changes, and only where activations are quantized (with nothing quantized the
prepared model stays the float model's function bit for bit). BatchNorms after a conv or linear are
left to :mod:`.fold_eval_batchnorm` and the exporter's fold.
"""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.capture.modal import graph_of_mode
from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.batchnorm_site import BatchNormSite, batchnorm_site, folding_producer
from qzo_fx.passes.prepare.fold_eval_batchnorm import own_eval_graph
from qzo_fx.passes.prepare.folded_batchnorm_ops import batchnorm_affine

__all__ = ["affine_eval_batchnorm"]

_AFFINE = batchnorm_affine._opoverload


def _quantizes_activations(gm: GraphModule) -> bool:
    container = getattr(gm, QUANT_CONTAINER, None)
    return container is not None and any(getattr(q, "role", None) == "activation" for q in container.children())


def _standalone_sites(gm: GraphModule) -> list[BatchNormSite]:
    return [site for node in gm.graph.nodes
            if (site := batchnorm_site(gm, node)) is not None and folding_producer(site) is None]


def _rewrite(gm: GraphModule, site: BatchNormSite) -> None:
    with gm.graph.inserting_before(site.node):
        affine = gm.graph.call_function(_AFFINE, (site.input, *site.reads(gm), site.eps))
    site.replace_in_eval_graph(gm, affine, (affine,))


def affine_eval_batchnorm(gm: GraphModule, *, ctx: object = None) -> PassResult:
    """Compute the eval graph's BatchNorms that fold into nothing as a multiply-add (see the module).

    Example:
        >>> import torch, qzo_fx
        >>> m = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3))
        >>> qm = qzo_fx.prepare(m, qzo_fx.QuantConfig(activation_bits=8), example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> sum(str(n.target) == 'qzo.batchnorm_affine.default' for n in qm.qzo_mode_graphs[False].nodes)
        1
    """
    if not hasattr(gm, "qzo_mode_graphs") or not _quantizes_activations(gm):
        return PassResult(gm, False)
    with graph_of_mode(gm, False):
        if not _standalone_sites(gm):
            return PassResult(gm, False)
    own_eval_graph(gm)
    with graph_of_mode(gm, False):
        for site in _standalone_sites(gm):
            _rewrite(gm, site)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, True)

