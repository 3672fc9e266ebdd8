"""Lift parameters: turn the perturbed parameters of a prepared graph into graph inputs.

The result is the *branch graph*: ``forward(theta_<p>..., *inputs)`` computes the model with
the given values in place of those parameters (quantized by the same, unperturbed scales).
Called with one value per parameter it is one branch; under ``torch.func.vmap`` with values
of shape ``[K, *p.shape]`` every lifted parameter carries a leading branch axis and all K
branches run as one batched computation.
"""
from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen, _PyTreeCodeGen

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext

__all__ = ["lift_params", "owned_reads", "call_with", "placeholder_name"]


class _FlatInputsCodeGen(_PyTreeCodeGen):
    """Plain positional inputs (as ``CodeGen``), outputs unflattened by the model's own spec."""

    def process_inputs(self, *inputs):
        return CodeGen.process_inputs(self, *inputs)

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)


def placeholder_name(param: str) -> str:
    """A Python identifier for the graph input of ``param`` (module names such as torchvision's
    ``block1-0`` hold characters an identifier cannot)."""
    return "theta_" + re.sub(r"\W", "_", param)


def owned_reads(gm: GraphModule, names: tuple[str, ...]) -> list[tuple[Node, dict[str, str]]]:
    """Module calls whose module itself holds perturbed parameters (a BatchNorm or LayerNorm the
    graph calls as a module): ``(node, {name in the module: full name})``."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        prefix = node.target + "."
        held = {name[len(prefix):]: name for name in names
                if name.startswith(prefix) and "." not in name[len(prefix):]}
        if held:
            found.append((node, held))
    return found


def call_with(gm: GraphModule, node: Node, values: dict[str, Node]) -> Node:
    """Replace the module call ``node`` by ``functional_call(module, values, args, kwargs)``."""
    with gm.graph.inserting_before(node):
        module = gm.graph.get_attr(node.target)
        new = gm.graph.call_function(torch.func.functional_call, (module, values, tuple(node.args), dict(node.kwargs)))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def lift_params(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind in ("streamed", "base"):
        return PassResult(gm, False)  # lean graphs read the parameters through the perturber; the base pass its own
    graph = gm.graph
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target in ctx.names]
    owned = owned_reads(gm, ctx.names)
    if not reads and not owned:
        return PassResult(gm, False)
    # A torch.export module flattens its inputs with a pytree spec that would not know the new
    # leading inputs: the branch graph takes flat positional tensors instead, and still returns
    # the model's output structure (loss_fn sees what the model returns).
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None and codegen.pytree_info.out_spec:
        graph._codegen = _FlatInputsCodeGen(codegen.pytree_info)
    else:
        graph._codegen = CodeGen()
    first = next(iter(graph.nodes))
    lifted = {}
    with graph.inserting_before(first):
        for name in ctx.names:
            lifted[name] = graph.placeholder(placeholder_name(name))
    for node in reads:
        node.replace_all_uses_with(lifted[node.target])
        graph.erase_node(node)
    for node, held in owned:  # the module runs with the lifted values in place of its own
        call_with(gm, node, {local: lifted[full] for local, full in held.items()})
    return PassResult(gm, True)
