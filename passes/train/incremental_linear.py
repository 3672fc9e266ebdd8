"""Incremental first layers in the sequential branch graph.

Each first layer's ``linear(x, Q(theta_k), b)`` becomes ``IncrementalLinear``: the base pass's
output plus ``x`` times the change of the quantized weight (see :mod:`qzo_fx.train.base_reuse`).
Runs after ``lift_params``: perturbed parameters are then the ``theta_*`` placeholders.
"""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.train.base_reuse import INCREMENTAL, IncrementalLinear
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.tap_base import ReuseContext, first_layers, lifted_reads

__all__ = ["incremental_linear"]


def incremental_linear(gm: GraphModule, *, ctx: ReuseContext) -> PassResult:
    layers = first_layers(gm, lifted_reads(ctx.names))
    if not layers:
        return PassResult(gm, False)
    gm.add_submodule(INCREMENTAL, IncrementalLinear(ctx.taps))
    for linear, x, weight in layers:
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        with gm.graph.inserting_before(linear):
            new = gm.graph.call_module(INCREMENTAL, (linear.name, x, weight, bias))
        linear.replace_all_uses_with(new)
        gm.graph.erase_node(linear)
    return PassResult(gm, True)
