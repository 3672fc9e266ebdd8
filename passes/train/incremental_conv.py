"""Incremental first convolutions in the sequential branch graph.

Each first convolution and the channel-wise chain after it (``act(bn(conv2d(x, Q(theta_k))))``)
becomes ``IncrementalConv``: the base pass's output of the chain, with only the output channels
whose quantized weight changed computed again (see :mod:`qzo_fx.train.conv_reuse`). Runs after
``lift_params``: perturbed parameters are then the ``theta_*`` placeholders.
"""
from __future__ import annotations

import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.train.conv_reuse import INCREMENTAL_CONV, ConvChain, IncrementalConv, function_step, module_step, norm_step
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.tap_base import ReuseContext, first_convolutions, lifted_reads

__all__ = ["incremental_conv"]


def incremental_conv(gm: GraphModule, *, ctx: ReuseContext) -> PassResult:
    found = first_convolutions(gm, lifted_reads(ctx.names))
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
