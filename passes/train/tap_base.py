"""Tap the base pass: record each first layer's input, quantized weight and output.

A *first layer* is a linear layer or 2-D convolution whose input and bias depend on no
perturbed parameter and whose weight is the q/dq of a perturbed one (see
:mod:`qzo_fx.train.base_reuse`, :mod:`qzo_fx.train.conv_reuse`); a convolution's output is taken after the
channel-wise nodes that follow it (BatchNorm, activations). In a copy of the model's graph used
for the base STE pass, that output goes through ``BaseTaps`` (an identity that keeps the values
for this step's branches); nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qzo_fx.train.base_reuse import TAPS, BaseTaps
from qzo_fx.train.conv_reuse import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_MODULES
from qzo_fx.quant.ops import fake_quant_kernel
from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.lift_params import placeholder_name

__all__ = ["ConvChainNodes", "ReuseContext", "first_convolutions", "first_layers", "lifted_reads", "tap_base"]

_LINEARS = (torch._C._nn.linear, F.linear)
_CONVS = (torch.conv2d, F.conv2d)
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)  # input, weight, bias, stride, padding, dilation, groups
_QDQ = (torch.ops.qzo.fake_quant.default, fake_quant_kernel)


@dataclass(frozen=True)
class ReuseContext:
    names: tuple[str, ...]   # perturbed parameters
    taps: BaseTaps           # shared by the base graph and the sequential branch graph


def lifted_reads(names: tuple[str, ...]) -> Callable[[Node], bool]:
    """In a branch graph: does a node read a perturbed parameter (its lifted placeholder)?"""
    lifted = {placeholder_name(name) for name in names}
    return lambda n: n.op == "placeholder" and n.target in lifted


def _tainted(gm: GraphModule, perturbed: Callable[[Node], bool]) -> set[Node]:
    """Nodes whose value depends on a perturbed parameter."""
    tainted: set[Node] = set()
    for node in gm.graph.nodes:
        if perturbed(node) or any(arg in tainted for arg in node.all_input_nodes):
            tainted.add(node)
    return tainted


def _first(x, weight, bias, tainted: set[Node], perturbed: Callable[[Node], bool]) -> bool:
    """Input and bias free of perturbed parameters; the weight the q/dq of one, read only here."""
    if not isinstance(x, Node) or x in tainted or (isinstance(bias, Node) and bias in tainted):
        return False
    return (isinstance(weight, Node) and weight.op == "call_function" and weight.target in _QDQ
            and len(weight.users) == 1 and isinstance(weight.args[0], Node) and perturbed(weight.args[0]))


def first_layers(gm: GraphModule, perturbed: Callable[[Node], bool]) -> list[tuple[Node, Node, Node]]:
    """``(linear, x, quantized weight)`` of every first layer; ``perturbed(node)`` says whether a
    node reads a perturbed parameter (a get_attr in the model, a placeholder in a branch graph)."""
    tainted = _tainted(gm, perturbed)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEARS or len(node.args) < 2:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if _first(x, weight, bias, tainted, perturbed):
            found.append((node, x, weight))
    return found


@dataclass(frozen=True)
class ConvChainNodes:
    """A first 2-D convolution (groups = 1) and the channel-wise nodes after it, each the only
    user of the one before (see :mod:`qzo_fx.train.conv_reuse`)."""

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


def first_convolutions(gm: GraphModule, perturbed: Callable[[Node], bool]) -> list[ConvChainNodes]:
    """Every first 2-D convolution with its channel-wise chain (``perturbed`` as for
    :func:`first_layers`)."""
    tainted = _tainted(gm, perturbed)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONVS or node.kwargs:
            continue
        x, weight, bias, stride, padding, dilation, groups = (*node.args, *_CONV_DEFAULTS[len(node.args):])[:7]
        if groups != 1 or not _first(x, weight, bias, tainted, perturbed):
            continue
        chain, current = [], node
        while len(current.users) == 1 and _channelwise(gm, next(iter(current.users)), current):
            current = next(iter(current.users))
            chain.append(current)
        found.append(ConvChainNodes(node, x, weight, bias, stride, padding, dilation, tuple(chain)))
    return found


def _channelwise(gm: GraphModule, node: Node, value: Node) -> bool:
    """``node`` computes each channel of ``value`` on its own: BatchNorm, element-wise."""
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return (len(node.args) == 1 and not node.kwargs
                and isinstance(module, (nn.modules.batchnorm._BatchNorm, *ELEMENTWISE_MODULES)))
    return (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS
            and not any(isinstance(a, Node) for a in (*node.args[1:], *node.kwargs.values())))


def tap_base(gm: GraphModule, *, ctx: ReuseContext) -> PassResult:
    perturbed = lambda n: n.op == "get_attr" and n.target in ctx.names  # noqa: E731
    layers = [(linear.name, x, weight, linear, True) for linear, x, weight in first_layers(gm, perturbed)]
    layers += [(c.conv.name, c.x, c.weight, c.end, False) for c in first_convolutions(gm, perturbed)]
    if not layers:
        return PassResult(gm, False)
    gm.add_submodule(TAPS, ctx.taps)
    for key, x, weight, out, copy in layers:
        with gm.graph.inserting_after(out):
            tap = gm.graph.call_module(TAPS, (key, x, weight, out, copy))
        out.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    return PassResult(gm, True)
