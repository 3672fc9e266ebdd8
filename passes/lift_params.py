"""Lift parameters: turn the perturbed parameters of a prepared graph into graph inputs.

The result is the *branch graph*: ``forward(theta_<p>..., *inputs)`` computes the model with
the given values in place of those parameters (quantized by the same, unperturbed scales).
Called with one value per parameter it is one branch; under ``torch.func.vmap`` with values
of shape ``[K, *p.shape]`` every lifted parameter carries a leading branch axis and all K
branches run as one batched computation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule
from torch.fx.graph import CodeGen

from qzo_fx.pass_infra import PassResult

__all__ = ["LiftContext", "lift_params", "placeholder_name"]


@dataclass(frozen=True)
class LiftContext:
    names: tuple[str, ...]  # parameter names, in the order of the new inputs


def placeholder_name(param: str) -> str:
    return "theta_" + param.replace(".", "_")


def lift_params(gm: GraphModule, *, ctx: LiftContext) -> PassResult:
    graph = gm.graph
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target in ctx.names]
    if not reads:
        return PassResult(gm, False)
    # A torch.export module flattens its inputs with a pytree spec that would not know the new
    # leading inputs: the branch graph takes flat positional tensors instead.
    graph._codegen = CodeGen()
    first = next(iter(graph.nodes))
    lifted = {}
    with graph.inserting_before(first):
        for name in ctx.names:
            lifted[name] = graph.placeholder(placeholder_name(name))
    for node in reads:
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    return PassResult(gm, True)
