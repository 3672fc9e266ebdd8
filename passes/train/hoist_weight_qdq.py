"""Hoist the q/dq of lifted weights out of the sequential branch graph into a prologue.

A lifted weight ``theta_<p>`` read only by ``fake_quant_kernel(theta_<p>, scale, zero_point,
...)`` (per tensor or per channel) is quantized by :class:`~qzo_fx.train.prologue.QuantPrologue`
before the graph runs; the graph then takes the quantized value as its input. Per-group and
1-bit quantizers, and weights with other readers, stay in the graph. Runs last in the
sequential pipeline (after ``incremental_linear`` and ``incremental_conv``, whose first-layer
match needs the q/dq node).
"""
from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qzo_fx.train.base_reuse import INCREMENTAL
from qzo_fx.train.conv_reuse import INCREMENTAL_CONV
from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.quant.ops import fake_quant_kernel
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.lift_params import LiftContext, placeholder_name
from qzo_fx.train.prologue import PROLOGUE, HoistedWeight, QuantPrologue
from qzo_fx.quant.quantizer import quantizer_read

__all__ = ["hoist_weight_qdq"]


def hoist_weight_qdq(gm: GraphModule, *, ctx: LiftContext) -> PassResult:
    if hasattr(gm, PROLOGUE):
        return PassResult(gm, False)
    index_of = {placeholder_name(name): i for i, name in enumerate(ctx.names)}
    hoisted, quantizers, first_layers = [], [], {}
    for theta in [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in index_of]:
        qdq = next(iter(theta.users), None)
        if (len(theta.users) != 1 or qdq.op != "call_function" or qdq.target is not fake_quant_kernel
                or len(qdq.args) < 7 or qdq.args[0] is not theta):
            continue  # other readers, another op, or arguments this pass does not parse: left alone
        _, scale, zero_point, qmin, qmax, axis, group_size = qdq.args[:7]
        read = quantizer_read(gm, scale)
        if group_size != 0 or read is None or quantizer_read(gm, zero_point) is None:
            continue
        first_layer, module = _first_layer(qdq)
        if module is not None:
            first_layers[first_layer] = gm.get_submodule(module)
        qdq.replace_all_uses_with(theta)
        gm.graph.erase_node(qdq)
        for attribute in (scale, zero_point):
            if not attribute.users:
                gm.graph.erase_node(attribute)
        hoisted.append(HoistedWeight(index_of[theta.target], f"{QUANT_CONTAINER}.{read[0]}", qmin, qmax, axis,
                                     first_layer))
        quantizers.append(read[1])
    if not hoisted:
        return PassResult(gm, False)
    gm.add_submodule(PROLOGUE, QuantPrologue(hoisted, quantizers, first_layers))
    return PassResult(gm, True)


def _first_layer(qdq: Node) -> tuple[Optional[str], Optional[str]]:
    """``(key, submodule)`` of the incremental first layer whose weight is ``qdq`` alone, if
    any: the prologue then hands that layer the list of changed weights."""
    users = list(qdq.users)
    if (len(users) == 1 and users[0].op == "call_module" and users[0].target in (INCREMENTAL, INCREMENTAL_CONV)
            and len(users[0].args) > 2 and users[0].args[2] is qdq and isinstance(users[0].args[0], str)):
        return users[0].args[0], users[0].target
    return None, None
