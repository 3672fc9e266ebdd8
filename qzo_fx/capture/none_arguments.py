"""Forward arguments that are None at capture: traced as the constant None, refused when given.

A symbolic trace would make such an argument a graph input and follow ``if mask is not None:``
as if a tensor were given; the call with None then computes ``x * None``. Capture traces it as
the constant None instead (torch.fx ``concrete_args``), so the graph holds the branch the model
takes for None, and a later call that passes a value gets an :class:`InputError` naming it.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch.fx
import torch.nn as nn
from torch.fx import Graph

from qzo_fx.errors import InputError

__all__ = ["none_arguments", "expect_none", "check_none_arguments"]


def none_arguments(model: nn.Module, args, kwargs) -> dict[str, None]:
    """Forward arguments that are None in this call (given as None or left at a None default).

    Symbolic tracing would turn them into graph inputs and follow ``if mask is not None:`` as if
    a tensor were given; they are traced as the constant None instead.
    """
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*(args or ()), **(kwargs or {}))
    except (TypeError, ValueError):
        return {}
    found = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = bound.arguments.get(name, parameter.default)
        if value is None:
            found[name] = None
    return found


@torch.fx.node.has_side_effect
def expect_none(value: Any, name: str, owner: str) -> None:
    """Refuse a value for an argument the graph of ``owner`` was captured with as the constant None."""
    if value is not None:
        raise InputError(f"{owner} (prepared) was called with '{name}', which was None when prepare() ran the "
                         f"examples: the graph was captured with {name}=None as a constant (the branch the model "
                         f"takes for None), and this call passes a {type(value).__name__}. Call it with {name}=None, "
                         f"or prepare again with a '{name}' among example_inputs / example_kwargs.")


def check_none_arguments(graph: Graph, model: nn.Module, fixed: dict[str, None]) -> None:
    """Make the arguments of ``graph`` traced as None take the forward's names and refuse values.

    torch.fx names such a placeholder ``mask_1`` (a call passing ``mask=None`` by keyword, as
    Hugging Face modules call their layers, would be refused) and checks it with an assertion
    that a re-trace (unpickling) cannot follow. Each one gets its name back and a call of
    :func:`expect_none`, which tracers keep as one call.
    """
    if not fixed:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # torch.fx makes one placeholder per forward parameter, in the signature's order.
    names = list(inspect.signature(model.forward).parameters)
    after = placeholders[-1]
    for node, name in zip(placeholders, names):
        if name not in fixed:
            continue
        for user in list(node.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
                graph.erase_node(user)
        node.target = name
        with graph.inserting_after(after):
            after = graph.call_function(expect_none, (node, name, type(model).__name__))
