"""Round BatchNorm-folded biases in the eval graph to int32, as the exported file stores them.

Export folds an eval-mode BatchNorm into the conv or linear before it:
``BN(conv(x, W) + b) = conv(x, W k) + B`` with ``k = gamma / sqrt(var + eps)`` and the folded
bias ``B = (b - mean) k + beta``. When that op's input and weight are both quantized, ONNX
Runtime runs it as an integer kernel (QLinearConv, QGemm) that adds the bias to the int32
accumulator, at the scale ``s_x * s_w * k``: a float ``B`` in the file is rounded there by the
runtime (its WeightBiasQuantization rewrite), and outputs move. So the exporter stores ``B`` as
int32 codes at that scale, and this pass makes the eval graph compute the same function: after
each such BatchNorm it adds the rounding error of ``B``::

    y = bn(conv(fq(x), fq(W), b))  ->  y + (round(B / s_b) * s_b - B),   s_b = s_x * s_w * k

The error is computed at every call from the BatchNorm's parameters and running statistics and
from the two quantizers' scales, so it follows training and re-calibration; it carries no
gradient (the straight-through view of a rounding). Where any ``k <= 0`` the exporter cannot
fold (that would need negative scales), and the error is 0.

Only the eval graph changes: in train mode BatchNorm normalizes with batch statistics and
nothing is folded. A model whose two modes share one graph gets its own eval graph here.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from qzo_fx.capture.modal import graph_of_mode
from qzo_fx.context import ANNOTATION_KEY
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.prepare.quantize_bias import BIAS_QRANGE
from qzo_fx.quant.ops import grid_codes
from qzo_fx.quant.quantizer import Quantizer, quantizer_of

__all__ = ["round_folded_bias", "add_folded_bias_error", "folded_bias_error", "folded_bias", "is_folded_bias_rounding",
           "FOLDABLE_BATCHNORMS", "FOLDABLE_PRODUCERS"]

aten = torch.ops.aten
# What export folds: exact types (timm's BatchNormAct2d subclasses add an activation), after
# these ops.
FOLDABLE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE_PRODUCERS = {F.conv1d, F.conv2d, F.conv3d, F.linear, aten.conv1d.default, aten.conv2d.default,
                      aten.conv3d.default, aten.linear.default}


def folded_bias(bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                eps: float, input_scale: Tensor, weight_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, s_b, k)``: the folded bias ``(b - mean) k + beta``, its int32 step ``s_x * (s_w k)``
    per output channel and ``k = gamma / sqrt(var + eps)``, in the exporter's order of operations
    (so both sides round the same float32 values).

    Example:
        >>> B, step, k = folded_bias(None, torch.zeros(2), torch.ones(2), None, torch.tensor([0.32, -0.11]),
        ...                          0.0, torch.tensor(0.1), torch.tensor([0.5, 0.25]))
        >>> [round(v, 4) for v in B.tolist()], [round(v, 4) for v in step.tolist()]
        ([0.32, -0.11], [0.05, 0.025])
    """
    k = (gamma if gamma is not None else 1.0) / torch.sqrt(var + eps)
    folded_weight_scale = weight_scale * k.reshape(-1) if weight_scale.dim() else weight_scale * k
    b = bias if bias is not None else torch.zeros_like(k)
    shift = beta if beta is not None else torch.zeros_like(k)
    return (b - mean) * k + shift, input_scale * folded_weight_scale, k


def folded_bias_error(y: Tensor, bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                      beta: Optional[Tensor], eps: float, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """``y`` (a BatchNorm's output, channels on axis 1) plus the int32 rounding error of the bias
    that folding the BatchNorm creates; 0 where the BatchNorm cannot be folded (some ``k <= 0``).
    Plain aten ops: the kernel of ``qzo.add_folded_bias_error``, and what an export that keeps the
    BatchNorm computes.

    Example:
        >>> y = torch.zeros(1, 2, 1, 1)  # B = [0.32, -0.11] on the steps [0.05, 0.025]: 0.30 and -0.10
        >>> out = folded_bias_error(y, None, torch.zeros(2), torch.ones(2), None, torch.tensor([0.32, -0.11]),
        ...                         0.0, torch.tensor(0.1), torch.tensor([0.5, 0.25]))
        >>> [round(v, 4) for v in out.flatten().tolist()]
        [-0.02, 0.01]
    """
    value, step, k = folded_bias(_detached(bias), mean.detach(), var.detach(), _detached(gamma), _detached(beta),
                                 eps, input_scale.detach(), weight_scale.detach())
    error = grid_codes(value, step, torch.zeros_like(step), *BIAS_QRANGE).mul_(step).sub_(value)
    error = torch.where((k > 0).all(), error, torch.zeros_like(error))  # k = 0 gives 0/0: not selected
    return y + error.reshape((1, -1) + (1,) * (y.dim() - 2))


# An op, not a Python function in the graph: GraphModule pickling traces the code again, and an
# op stays one node there (the exporter finds it by its target).
@torch.library.custom_op("qzo::add_folded_bias_error", mutates_args=())
def add_folded_bias_error(y: Tensor, bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                          beta: Optional[Tensor], eps: float, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    return folded_bias_error(y, bias, mean, var, gamma, beta, eps, input_scale, weight_scale)


@add_folded_bias_error.register_fake
def _(y, bias, mean, var, gamma, beta, eps, input_scale, weight_scale):
    return torch.empty_like(y)


def _keep_nothing(ctx, inputs, output) -> None:
    pass


def _identity_backward(ctx, grad: Tensor):
    # A rounding seen straight through: y's gradient passes unchanged; the error is a constant.
    return grad, None, None, None, None, None, None, None, None


add_folded_bias_error.register_autograd(_identity_backward, setup_context=_keep_nothing)


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


_ROUNDING_OP = torch.ops.qzo.add_folded_bias_error.default


def is_folded_bias_rounding(node: object) -> bool:
    """True for the nodes this pass inserts."""
    return isinstance(node, Node) and node.op == "call_function" and node.target is _ROUNDING_OP


def _quantizer(gm: GraphModule, value: object) -> Optional[Quantizer]:
    found = quantizer_of(gm, value) if isinstance(value, Node) else None
    return None if found is None else found[1]


def _integer_kernel_inputs(gm: GraphModule, producer: Node) -> Optional[tuple[Node, Node]]:
    """``(input scale read, weight scale read)`` when ``producer`` multiplies a per-tensor quantized
    input by a weight quantized per tensor or per output channel (what an integer kernel takes)."""
    annotation = producer.meta.get(ANNOTATION_KEY)
    if annotation is None or annotation.signature.input_arg is None or len(producer.args) < 2:
        return None
    x_fq, w_fq = producer.args[annotation.signature.input_arg], producer.args[annotation.signature.weight_arg]
    x_q, w_q = _quantizer(gm, x_fq), _quantizer(gm, w_fq)
    if x_q is None or w_q is None or x_q.role != "activation" or w_q.role != "weight":
        return None
    if x_q.is_sign or w_q.is_sign or w_q.group_size or x_q.scale.dim() != 0 or w_q.axis not in (0, -1):
        return None  # sign grids and blocked weights have no integer kernel; folding scales axis 0
    return x_fq.args[1], w_fq.args[1]


def _site(gm: GraphModule, node: Node) -> Optional[tuple[nn.Module, Node, Node, Node]]:
    """``(batchnorm, its input producer, input scale read, weight scale read)`` for a BatchNorm the
    exporter folds into an integer-kernel op."""
    if node.op != "call_module" or any(is_folded_bias_rounding(user) for user in node.users):
        return None
    bn = gm.get_submodule(str(node.target))
    if type(bn) not in FOLDABLE_BATCHNORMS or bn.running_mean is None or bn.running_var is None:
        return None
    producer = node.args[0] if node.args else None
    if not isinstance(producer, Node) or producer.target not in FOLDABLE_PRODUCERS or len(producer.users) != 1:
        return None
    scales = _integer_kernel_inputs(gm, producer)
    return None if scales is None else (bn, producer, *scales)


def _add_rounding(gm: GraphModule, node: Node, bn: nn.Module, producer: Node, x_scale: Node, w_scale: Node) -> None:
    graph, prefix = gm.graph, str(node.target)
    bias = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
    with graph.inserting_before(node):
        # Reads of their own: passes that rewrite the quantizers' nodes leave these in place.
        reads = [graph.get_attr(f"{prefix}.{name}") if getattr(bn, name) is not None else None
                 for name in ("running_mean", "running_var", "weight", "bias")]
        scales = [graph.get_attr(str(read.target)) for read in (x_scale, w_scale)]
    with graph.inserting_after(node):
        rounded = graph.call_function(_ROUNDING_OP, (node, bias, *reads, float(bn.eps), *scales))
    if "nn_module_stack" in node.meta:
        rounded.meta["nn_module_stack"] = node.meta["nn_module_stack"]
    node.replace_all_uses_with(rounded, delete_user_cb=lambda user: user is not rounded)


def _own_eval_graph(gm: GraphModule) -> None:
    """Give the eval mode a graph of its own where both modes share one."""
    graphs = gm.qzo_mode_graphs
    if graphs[True] is graphs[False]:
        graphs[False] = copy.deepcopy(graphs[True])


def round_folded_bias(gm: GraphModule, *, ctx: object = None) -> PassResult:
    """Add the int32 rounding error of BatchNorm-folded biases to the eval graph (see the module).

    Example:
        >>> import torch, qzo_fx
        >>> from qzo_fx.passes.prepare.round_folded_bias import is_folded_bias_rounding
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> qm = qzo_fx.prepare(m, qzo_fx.QuantConfig(activation_bits=8), example_inputs=(torch.randn(2, 3, 8, 8),))
        >>> [n.name for n in qm.qzo_mode_graphs[False].nodes if is_folded_bias_rounding(n)]
        ['add_folded_bias_error_default']
    """
    if not hasattr(gm, "qzo_mode_graphs"):
        return PassResult(gm, False)  # one graph for both modes: nothing is eval-only
    with graph_of_mode(gm, False):
        if not any(_site(gm, node) is not None for node in gm.graph.nodes):
            return PassResult(gm, False)
    _own_eval_graph(gm)
    with graph_of_mode(gm, False):
        for node, site in [(node, site) for node in gm.graph.nodes if (site := _site(gm, node)) is not None]:
            _add_rounding(gm, node, *site)
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, True)
