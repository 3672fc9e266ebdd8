"""Tap the base pass: keep each first convolution chain's input, quantized weight and output.

A *first convolution* is a 2-D convolution (groups = 1) whose input and bias depend on no
perturbed parameter and whose weight is the q/dq of a perturbed one; its *chain* is the
channel-wise nodes after it, each the only user of the one before (BatchNorm, element-wise
activations, max pooling; :mod:`qzo_fx.train.reuse`). In a copy of the model's graph run for
the base STE pass, the chain's output goes through ``qzo_base_taps`` (an identity that keeps
the values for this step's branches); nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext
from qzo_fx.quant.ops import fake_quant_kernel
from qzo_fx.train.reuse import CHANNELWISE_FUNCTIONS, CHANNELWISE_MODULES, TAPS

__all__ = ["ConvChainNodes", "first_convolutions", "tap_base"]

_CONVS = (torch.conv2d, F.conv2d)
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)  # input, weight, bias, stride, padding, dilation, groups
_QDQ = (torch.ops.qzo.fake_quant.default, fake_quant_kernel)


@dataclass(frozen=True)
class ConvChainNodes:
    conv: Node
    x: Node
    weight: Node
    bias: Optional[Node]
    stride: Any
    padding: Any
    dilation: Any
    chain: tuple[Node, ...]

    @property
    def end(self) -> Node:
        return self.chain[-1] if self.chain else self.conv


def _tainted(gm: GraphModule, perturbed: Callable[[Node], bool]) -> set[Node]:
    """Nodes whose value depends on a perturbed parameter."""
    tainted: set[Node] = set()
    for node in gm.graph.nodes:
        if perturbed(node) or any(arg in tainted for arg in node.all_input_nodes):
            tainted.add(node)
    return tainted


def _channelwise(gm: GraphModule, node: Node, value: Node) -> bool:
    """``node`` computes each channel of ``value`` on its own."""
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return (len(node.args) == 1 and not node.kwargs and not getattr(module, "return_indices", False)
                and isinstance(module, (nn.modules.batchnorm._BatchNorm, *CHANNELWISE_MODULES)))
    return (node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS
            and not node.kwargs.get("return_indices", False)
            and not any(isinstance(a, Node) for a in (*node.args[1:], *node.kwargs.values())))


def first_convolutions(gm: GraphModule, perturbed: Callable[[Node], bool]) -> list[ConvChainNodes]:
    """Every first convolution with its chain; ``perturbed(node)``: does the node read a perturbed
    parameter (a get_attr in the model's graph, a lifted placeholder in a branch graph)?"""
    tainted, found = _tainted(gm, perturbed), []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONVS or node.kwargs:
            continue
        x, weight, bias, stride, padding, dilation, groups = (*node.args, *_CONV_DEFAULTS[len(node.args):])[:7]
        first = (isinstance(x, Node) and x not in tainted and not (isinstance(bias, Node) and bias in tainted)
                 and isinstance(weight, Node) and weight.op == "call_function" and weight.target in _QDQ
                 and len(weight.users) == 1 and isinstance(weight.args[0], Node) and perturbed(weight.args[0]))
        if groups != 1 or not first:
            continue
        chain, current = [], node
        while len(current.users) == 1 and _channelwise(gm, next(iter(current.users)), current):
            current = next(iter(current.users))
            chain.append(current)
        found.append(ConvChainNodes(node, x, weight, bias, stride, padding, dilation, tuple(chain)))
    return found


def tap_base(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind != "base" or ctx.taps is None or hasattr(gm, TAPS):
        return PassResult(gm, False)
    found = first_convolutions(gm, lambda n: n.op == "get_attr" and n.target in ctx.names)
    if not found:
        return PassResult(gm, False)
    gm.add_submodule(TAPS, ctx.taps)
    for c in found:
        with gm.graph.inserting_after(c.end):
            tap = gm.graph.call_module(TAPS, (c.conv.name, c.x, c.weight, c.end))
        c.end.replace_all_uses_with(tap, delete_user_cb=lambda user, new=tap: user is not new)
    return PassResult(gm, True)
