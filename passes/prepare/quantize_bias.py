"""Quantize bias: round the bias of integer-kernel ops to int32 at ``s_x * s_w``, as the runtime does.

ONNX Runtime runs a conv or linear whose input and weight are both quantized as an integer
kernel (QLinearConv, QGemm): the bias is added to the int32 accumulator, so a float bias is
first rounded to int32 at the scale ``s_x * s_w`` (activation step times weight step, per
output channel). Below 8 bits that step is coarse. This pass puts the same rounding into the
training graph::

    F.linear(fq(x), fq(W), b)  ->  F.linear(fq(x), fq(W), fake_quant(b, s_x * s_w, int32 grid))

so training, the exported file (an int32 bias + DequantizeLinear) and the runtime compute one
function. The bias keeps its identity-STE gradient; the bias scale is read from the two
quantizers at every call (it follows learned or re-calibrated scales) and gets no gradient.

A weight channel that is all zero (a zero-initialised layer: a spatial transformer's localisation
head, whose bias is the identity transform) gets the smallest weight scale, and ``b / (s_x s_w)``
then lies far outside int32: the bias would be clipped to a few percent of its value. Before the
bias is quantized, each such weight scale entry is raised until the bias codes fit
``BIAS_HEADROOM`` (2^24, the integers float32 holds exactly, 128x below the int32 limit, room for
the bias to grow in training). The channel's codes stay what they were (all zero).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from qzo_fx.context import ANNOTATION_KEY
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.calibration import MIN_SCALE
from qzo_fx.quant.quantizer import Quantizer, quantizer_of

__all__ = ["quantize_bias", "BIAS_QRANGE", "BIAS_HEADROOM", "is_bias_fake_quant"]

aten = torch.ops.aten
# The int32 grid, narrowed to values float32 holds exactly (2**31 - 1 rounds up to 2**31 in
# float32 and would overflow int32 when the codes are stored).
BIAS_QRANGE = (-(2**31) + 128, 2**31 - 128)
BIAS_HEADROOM = 2.0**24
_BIAS_ARG = {"linear": 2, "conv": 2, "conv_transpose": 2}


def is_bias_fake_quant(node: Node) -> bool:
    """True for the ``qzo.fake_quant`` nodes this pass inserts (recognised by their int32 grid)."""
    return (node.op == "call_function" and node.target is torch.ops.qzo.fake_quant.default
            and tuple(node.args[3:5]) == BIAS_QRANGE)


def _bias_position(node: Node, kind: str) -> Optional[int]:
    if node.target is aten.addmm.default:
        return 0  # bias + x @ W (Hugging Face Conv1D after torch.export)
    if node.target is aten.convolution.default:
        return 2
    return _BIAS_ARG.get(kind) if node.op == "call_function" else None


def _quantizer(gm: GraphModule, value: object) -> Optional[Quantizer]:
    found = quantizer_of(gm, value) if isinstance(value, Node) else None
    return None if found is None else found[1]


def _bias_site(gm: GraphModule, node: Node):
    """``(bias position, bias, input fake_quant node, weight fake_quant node)`` if ``node`` adds a
    float parameter bias to a product of a quantized input and a quantized weight, else None."""
    annotation = node.meta.get(ANNOTATION_KEY)
    if annotation is None or annotation.weight is None or annotation.activation is None:
        return None
    sig = annotation.signature
    position = _bias_position(node, sig.kind)
    if position is None or len(node.args) <= position or sig.input_arg is None:
        return None
    bias = node.args[position]
    if not isinstance(bias, Node) or bias.op != "get_attr":
        return None  # no bias, or already quantized
    x_q, w_q = _quantizer(gm, node.args[sig.input_arg]), _quantizer(gm, node.args[sig.weight_arg])
    if x_q is None or w_q is None or x_q.is_sign or w_q.group_size:
        return None  # float input, or a blocked weight (no integer kernel takes those)
    bias_value = gm.get_parameter(str(bias.target)) if _is_parameter(gm, bias) else None
    if bias_value is None or bias_value.dim() != 1:
        return None
    weight = _latent_weight(gm, node.args[sig.weight_arg])
    if w_q.scale.dim() == 1 and (weight is None or w_q.axis != sig.channel_axis % weight.dim()
                                 or w_q.scale.numel() != bias_value.numel()):
        return None  # scales along another axis than the bias's (e.g. a grouped transposed conv)
    return position, bias_value, node.args[sig.input_arg], node.args[sig.weight_arg]


def _latent_weight(gm: GraphModule, fq: Node) -> Optional[torch.Tensor]:
    """The latent weight read by a weight fake_quant node."""
    source = fq.args[0]
    return gm.get_parameter(str(source.target)) if isinstance(source, Node) and _is_parameter(gm, source) else None


def _is_parameter(gm: GraphModule, node: Node) -> bool:
    try:
        gm.get_parameter(str(node.target))
        return True
    except AttributeError:
        return False


def _fit_weight_scale(gm: GraphModule, bias: torch.Tensor, x_fq: Node, w_fq: Node) -> None:
    """Raise the weight scale entries whose bias codes ``b / (s_x s_w)`` exceed ``BIAS_HEADROOM``."""
    x_q, w_q, weight = _quantizer(gm, x_fq), _quantizer(gm, w_fq), _latent_weight(gm, w_fq)
    with torch.no_grad():
        needed = bias.detach().abs().float() / (x_q.scale.detach().min() * BIAS_HEADROOM)
        needed = needed if w_q.scale.dim() == 1 else needed.max()
        if weight is not None and bool((needed > w_q.scale.detach()).any()):
            # The floor keeps what an earlier site of this weight raised (one weight, two biases).
            floor = torch.maximum(needed.clamp_min(MIN_SCALE).to(w_q.scale.device), w_q.scale.detach())
            w_q.initialize(weight, min_scale=floor)


def quantize_bias(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        site = _bias_site(gm, node)
        if site is None:
            continue
        position, bias_value, x_fq, w_fq = site
        bias = node.args[position]
        _fit_weight_scale(gm, bias_value, x_fq, w_fq)
        with gm.graph.inserting_before(node):
            product = gm.graph.call_function(aten.mul.Tensor, (x_fq.args[1], w_fq.args[1]))
            scale = gm.graph.call_function(aten.detach.default, (product,))
            zero = gm.graph.call_function(aten.zeros_like.default, (scale,))
            axis = 0 if _quantizer(gm, w_fq).scale.dim() == 1 else -1  # per output channel, or one scale
            quantized = gm.graph.call_function(torch.ops.qzo.fake_quant.default,
                                               (bias, scale, zero, *BIAS_QRANGE, axis, 0, "identity"))
        node.update_arg(position, quantized)
        modified = True
    return PassResult(gm, modified)
