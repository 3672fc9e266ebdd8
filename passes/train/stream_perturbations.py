"""Stream perturbations: every read of a perturbed parameter goes through ``qzo_perturber``.

The result is the *lean* branch graph: ``qzo_perturber(theta_i, i)`` returns
``theta_i + sign * eps_i * v_ki``, computing ``v_ki`` from tensor i's own noise stream right where
the layer needs it. The perturbed copy lives only until its layer has used it, so a branch's
extra memory is about the largest perturbed tensor, not the model, and theta is never written.
"""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext
from qzo_fx.passes.train.lift_params import call_with, owned_reads

__all__ = ["stream_perturbations", "PERTURBER"]

PERTURBER = "qzo_perturber"  # the graph's submodule; a read of names[i] becomes qzo_perturber(theta, i)


def stream_perturbations(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind != "streamed" or not hasattr(gm, PERTURBER):
        return PassResult(gm, False)
    modified = False
    index = {name: i for i, name in enumerate(ctx.names)}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in index:
            continue
        if any(user.op == "call_module" and user.target == PERTURBER for user in node.users):
            continue  # already streamed
        with gm.graph.inserting_after(node):
            perturbed = gm.graph.call_module(PERTURBER, (node, index[node.target]))
        node.replace_all_uses_with(perturbed, delete_user_cb=lambda user, new=perturbed: user is not new)
        modified = True
    for node, held in owned_reads(gm, ctx.names):  # parameters a module reads itself
        values = {}
        with gm.graph.inserting_before(node):
            for local, full in held.items():
                values[local] = gm.graph.call_module(PERTURBER, (gm.graph.get_attr(full), index[full]))
        call_with(gm, node, values)
        modified = True
    return PassResult(gm, modified)
