"""Whether a model draws random numbers in its forward (dropout, stochastic depth, noise).

Branches replay the base pass's random state so that they see its dropout masks. Under
``torch.func.vmap`` dropout is drawn by a batching rule (``bernoulli_``), which on CPU is also
what eager dropout does, but on CUDA eager dropout is a fused kernel that consumes the generator
differently: there, batched branches share one mask with each other but not with the base pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule

__all__ = ["uses_randomness", "uses_aten_dropout"]

_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.randint, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, torch.dropout,
    torch.alpha_dropout, torch.feature_alpha_dropout, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.gumbel_softmax, F.rrelu,
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial"}


def _random_node(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    tags = getattr(node.target, "tags", ())  # aten overloads (torch.export graphs) say it themselves
    return node.target in _RANDOM_FUNCTIONS or torch.Tag.nondeterministic_seeded in tags


def uses_randomness(model: nn.Module) -> bool:
    """True if a dropout module with p > 0, or a random op in any traced graph, is in ``model``.
    Code inside an untraced leaf module other than dropout is not visible here."""
    for module in model.modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU)) and getattr(module, "p", 1.0) > 0:
            return True
        if isinstance(module, GraphModule) and any(_random_node(n) for n in module.graph.nodes):
            return True
    return False


_ATEN_DROPOUTS = {torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default,
                  torch.ops.aten.feature_dropout.default, torch.ops.aten.alpha_dropout.default}


def uses_aten_dropout(model: nn.Module) -> bool:
    """True if a traced graph calls aten's dropout (a torch.export capture): under vmap it draws
    its masks in another order than eagerly, on a CPU too (measured: other branch losses)."""
    return any(isinstance(m, GraphModule) and any(n.op == "call_function" and n.target in _ATEN_DROPOUTS
                                                  for n in m.graph.nodes)
               for m in model.modules())
