"""Hoist the q/dq of lifted weights out of the sequential branch graph into a prologue.

A lifted weight ``theta_<p>`` read only by ``fake_quant_kernel(theta_<p>, scale, zero_point, ...)``
(per tensor or per channel) is perturbed and quantized by
:class:`~qzo_fx.train.prologue.QuantPrologue` before the graph runs; the graph then takes the
quantized value as its input. Per-group and 1-bit quantizers, and weights with other readers,
stay in the graph. Runs after ``lower_qdq`` (it matches the lowered kernel).
"""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext
from qzo_fx.passes.train.lift_params import placeholder_name
from qzo_fx.quant.ops import fake_quant_kernel
from qzo_fx.quant.quantizer import quantizer_read
from qzo_fx.train.prologue import PROLOGUE, HoistedWeight, QuantPrologue

__all__ = ["hoist_weight_qdq"]


def hoist_weight_qdq(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind != "sequential" or hasattr(gm, PROLOGUE):
        return PassResult(gm, False)
    index_of = {placeholder_name(name): i for i, name in enumerate(ctx.names)}
    hoisted, quantizers = [], []
    for theta in [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in index_of]:
        qdq = next(iter(theta.users), None)
        if (len(theta.users) != 1 or qdq.op != "call_function" or qdq.target is not fake_quant_kernel
                or len(qdq.args) < 7 or qdq.args[0] is not theta):
            continue  # other readers, another op, or arguments this pass does not parse: left alone
        _, scale, zero_point, qmin, qmax, axis, group_size = qdq.args[:7]
        read = quantizer_read(gm, scale)
        if group_size != 0 or read is None or quantizer_read(gm, zero_point) is None:
            continue
        qdq.replace_all_uses_with(theta)
        gm.graph.erase_node(qdq)
        for attribute in (scale, zero_point):
            if not attribute.users:
                gm.graph.erase_node(attribute)
        hoisted.append(HoistedWeight(index_of[theta.target], f"{QUANT_CONTAINER}.{read[0]}", qmin, qmax, axis))
        quantizers.append(read[1])
    if not hoisted:
        return PassResult(gm, False)
    gm.add_submodule(PROLOGUE, QuantPrologue(hoisted, quantizers))
    return PassResult(gm, True)
