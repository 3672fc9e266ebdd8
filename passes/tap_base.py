"""Tap the base pass: record each first layer's input, quantized weight and output.

A *first layer* is a linear layer whose input and bias depend on no perturbed parameter and
whose weight is the q/dq of a perturbed one (see :mod:`qzo_fx.base_reuse`). In a copy of the
model's graph used for the base STE pass, its output goes through ``BaseTaps`` (an identity
that keeps the values for this step's branches); nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qzo_fx.base_reuse import TAPS, BaseTaps
from qzo_fx.ops import fake_quant_kernel
from qzo_fx.pass_infra import PassResult

__all__ = ["ReuseContext", "first_layers", "tap_base"]

_LINEARS = (torch._C._nn.linear, F.linear)
_QDQ = (torch.ops.qzo.fake_quant.default, fake_quant_kernel)


@dataclass(frozen=True)
class ReuseContext:
    names: tuple[str, ...]   # perturbed parameters
    taps: BaseTaps           # shared by the base graph and the sequential branch graph


def first_layers(gm: GraphModule, perturbed: Callable[[Node], bool]) -> list[tuple[Node, Node, Node]]:
    """``(linear, x, quantized weight)`` of every first layer; ``perturbed(node)`` says whether a
    node reads a perturbed parameter (a get_attr in the model, a placeholder in a branch graph)."""
    tainted: set[Node] = set()
    for node in gm.graph.nodes:
        if perturbed(node) or any(arg in tainted for arg in node.all_input_nodes):
            tainted.add(node)
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEARS or len(node.args) < 2:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not isinstance(x, Node) or x in tainted or (isinstance(bias, Node) and bias in tainted):
            continue
        if (isinstance(weight, Node) and weight.op == "call_function" and weight.target in _QDQ
                and len(weight.users) == 1 and isinstance(weight.args[0], Node) and perturbed(weight.args[0])):
            found.append((node, x, weight))
    return found


def tap_base(gm: GraphModule, *, ctx: ReuseContext) -> PassResult:
    layers = first_layers(gm, lambda n: n.op == "get_attr" and n.target in ctx.names)
    if not layers:
        return PassResult(gm, False)
    gm.add_submodule(TAPS, ctx.taps)
    for linear, x, weight in layers:
        with gm.graph.inserting_after(linear):
            tap = gm.graph.call_module(TAPS, (linear.name, x, weight, linear))
        linear.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    return PassResult(gm, True)
