"""Incremental first convolutions in the sequential branch graph.

Each first convolution and its channel-wise chain (see ``tap_base``) becomes
``qzo_incremental_conv(key, x, Q(theta), bias)``: the base pass's output of the chain, with only
the output channels whose quantized weight changed computed again (:mod:`qzo_fx.train.reuse`).
Runs after ``lift_params`` (perturbed parameters are then ``theta_*`` placeholders) and before
``hoist_weight_qdq`` (which then feeds it the prologue's quantized weight). Only where the step
taps its base pass (``ctx.taps``).
"""
from __future__ import annotations

import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext
from qzo_fx.passes.train.lift_params import placeholder_name
from qzo_fx.passes.train.tap_base import first_convolutions
from qzo_fx.train.reuse import INCREMENTAL_CONV, ConvChain, IncrementalConv, function_step, module_step, norm_step

__all__ = ["incremental_conv"]


def incremental_conv(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind != "sequential" or ctx.taps is None or hasattr(gm, INCREMENTAL_CONV):
        return PassResult(gm, False)
    lifted = {placeholder_name(name) for name in ctx.names}
    found = first_convolutions(gm, lambda n: n.op == "placeholder" and n.target in lifted)
    if not found:
        return PassResult(gm, False)
    chains = {c.conv.name: ConvChain(c.stride, c.padding, c.dilation, tuple(_step(gm, n) for n in c.chain))
              for c in found}
    gm.add_submodule(INCREMENTAL_CONV, IncrementalConv(ctx.taps, chains))
    for c in found:
        with gm.graph.inserting_before(c.conv):
            new = gm.graph.call_module(INCREMENTAL_CONV, (c.conv.name, c.x, c.weight, c.bias))
        c.end.replace_all_uses_with(new)
        for node in reversed((c.conv, *c.chain)):
            gm.graph.erase_node(node)
    return PassResult(gm, True)


def _step(gm: GraphModule, node: Node):
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return norm_step(module) if isinstance(module, nn.modules.batchnorm._BatchNorm) else module_step(module)
    return function_step(node.target, node.args[1:], dict(node.kwargs))
