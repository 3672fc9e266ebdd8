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
from torch.fx.graph import CodeGen, _PyTreeCodeGen

from qzo_fx.pass_infra import PassResult

__all__ = ["LiftContext", "lift_params", "placeholder_name"]


@dataclass(frozen=True)
class LiftContext:
    names: tuple[str, ...]  # parameter names, in the order of the new inputs


class _FlatInputsCodeGen(_PyTreeCodeGen):
    """Plain positional inputs (as ``CodeGen``), outputs unflattened by the model's own spec."""

    def process_inputs(self, *inputs):
        return CodeGen.process_inputs(self, *inputs)

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)


def placeholder_name(param: str) -> str:
    return "theta_" + param.replace(".", "_")


def lift_params(gm: GraphModule, *, ctx: LiftContext) -> PassResult:
    graph = gm.graph
    reads = [n for n in graph.nodes if n.op == "get_attr" and n.target in ctx.names]
    if not reads:
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
    return PassResult(gm, True)
