"""Where a model's train-mode and eval-mode graphs differ, by module.

Both captures of a model are aligned op by op; what one mode runs and the other does not (drop
path's random mask, batch-norm's training flag, a branch on ``self.training``) is reported under
the innermost module it came from. Modules the graph calls as modules (``nn.Dropout``,
``nn.BatchNorm2d``) follow their own ``training`` flag at run time and are listed apart.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

import torch.nn as nn
from torch.fx import Graph, GraphModule, Node

__all__ = ["ModeDifference", "mode_differences"]

def _follows_mode(module: nn.Module) -> bool:
    """True for torch modules whose forward depends on ``self.training``."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return module.dropout > 0
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.track_running_stats
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class ModeDifference:
    where: str                   # module path ("" for the root)
    module_type: str
    train_only: tuple[str, ...]  # ops the train-mode graph runs there and the eval-mode graph does not
    eval_only: tuple[str, ...]
    how: str                     # "captured per mode" or "the module follows its own mode"

    def __str__(self) -> str:
        parts = [f"train: {', '.join(self.train_only)}" if self.train_only else "",
                 f"eval: {', '.join(self.eval_only)}" if self.eval_only else ""]
        detail = "; ".join(p for p in parts if p) or self.how
        return f"{self.where or '<root>'} ({self.module_type}): {detail}"


def _signature(node: Node) -> tuple:
    # Arguments that are not nodes (dropout's p and train flag, batch norm's training) are part
    # of what a mode changes; node arguments are compared by position only.
    constants = tuple(a for a in node.args if not isinstance(a, (Node, list, tuple, dict)))
    constants += tuple(f"{k}={v}" for k, v in node.kwargs.items() if not isinstance(v, (Node, list, tuple, dict)))
    return node.op, str(node.target), constants


def _owner(node: Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return str(path), str(cls if isinstance(cls, str) else getattr(cls, "__name__", cls)).rpartition(".")[2]


def _label(node: Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target)).split(".")[0] if node.op != "call_module" else str(target)
    constants = _signature(node)[2]
    shown = ", ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in constants)
    return f"{name}({shown})" if constants else name


def _no_op(node: Node) -> bool:
    """Dropout with p = 0 is the identity in both modes: not a difference worth reporting."""
    constants = _signature(node)[2]
    return "dropout" in str(node.target) and bool(constants) and constants[0] == 0.0


def _graph_differences(train: Graph, evaluation: Graph) -> list[ModeDifference]:
    a, b = list(train.nodes), list(evaluation.nodes)
    matcher = difflib.SequenceMatcher(a=[_signature(n) for n in a], b=[_signature(n) for n in b], autojunk=False)
    found: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for nodes, side in ((a[i1:i2], 0), (b[j1:j2], 1)):
            for node in nodes:
                if node.op in ("placeholder", "output", "get_attr") or _no_op(node):
                    continue
                ops = found.setdefault(_owner(node), ([], []))[side]
                if _label(node) not in ops:
                    ops.append(_label(node))
    return [ModeDifference(path, cls, tuple(t), tuple(e), "captured per mode")
            for (path, cls), (t, e) in found.items()]


def _mode_modules(gm: GraphModule, graphs: Iterable[Graph]) -> list[ModeDifference]:
    called = {str(n.target) for g in graphs for n in g.nodes if n.op == "call_module"}
    rows = []
    for name in sorted(called):
        module = gm.get_submodule(name)
        if _follows_mode(module):
            rows.append(ModeDifference(name, type(module).__name__, (), (), "the module follows its own mode"))
    return rows


def mode_differences(gm: GraphModule) -> list[ModeDifference]:
    """What differs between the modes of a captured or prepared model (empty when nothing does)."""
    graphs = getattr(gm, "qzo_mode_graphs", {True: gm.graph, False: gm.graph})
    captured = [] if graphs[True] is graphs[False] else _graph_differences(graphs[True], graphs[False])
    return captured + _mode_modules(gm, {id(g): g for g in graphs.values()}.values())
