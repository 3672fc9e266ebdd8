"""Partial capture: quantize what can be traced when the whole model cannot be captured.

When neither symbolic tracing nor torch.export captures the model, the smallest untraceable
submodules become leaves of the trace and are handled on their own, recursively: their traceable
children are prepared (graph mode) and what remains runs eagerly. If the root's own forward is
untraceable, the root stays an eager module whose children are prepared one by one. Each part is
traced in both modes, like a whole model, and calibrated with the inputs it received in one run
of the model on the example inputs in each mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.capture.modal import PreparedModel
from qzo_fx.capture.tracing import CaptureReport, StateTracer, graph_module_names, modes_kept, trace_modes

__all__ = ["PartialReport", "prepare_partially", "untraceable_modules"]


@dataclass
class PartialReport:
    """Which parts are quantized in graph mode, which run eagerly, and why."""

    graph: list[str] = field(default_factory=list)              # prepared GraphModules (qualified names)
    eager: dict[str, str] = field(default_factory=dict)         # module -> why it could not be traced
    skipped: dict[str, str] = field(default_factory=dict)       # module -> why it was left in float

    def __str__(self) -> str:
        lines = ["qzo_fx partial capture:"]
        lines += [f"  graph mode: {name or '<root>'}" for name in self.graph]
        lines += [f"  eager: {name or '<root>'} ({why})" for name, why in self.eager.items()]
        lines += [f"  float: {name} ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


class _LeafTracer(StateTracer):
    # ``leaves`` defaults to none: unpickling a part re-traces it with ``tracer_cls()``.
    def __init__(self, leaves: Optional[set[nn.Module]] = None) -> None:
        super().__init__()
        self.leaves = leaves if leaves is not None else set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m in self.leaves or super().is_leaf_module(m, qualname)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _trace_error(module: nn.Module, leaves: set[nn.Module]) -> Optional[str]:
    try:
        _LeafTracer(leaves).trace(module)
        return None
    except Exception as error:
        return _reason(error)


def untraceable_modules(model: nn.Module) -> dict[str, str]:
    """Submodules that symbolic tracing cannot follow on their own, with the reason (deepest first
    found; a module counts as untraceable only if its untraceable children as leaves do not help)."""
    found: dict[str, str] = {}
    leaves: set[nn.Module] = set()
    for name, module in reversed(list(model.named_modules())):
        error = _trace_error(module, leaves)
        if error is not None:
            found[name] = error
            leaves.add(module)
    return found


Inputs = dict[bool, tuple[tuple, dict]]  # mode -> (args, kwargs)


def _record_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[nn.Module, Inputs]:
    """What each submodule receives in one run of the model in each mode (state restored)."""
    seen: dict[nn.Module, Inputs] = {}
    buffers = [(b, b.clone()) for b in model.buffers()]
    for training in (False, True):
        def hook(module, margs, mkwargs, training=training):
            seen.setdefault(module, {}).setdefault(training, (tuple(margs), dict(mkwargs)))

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
        try:
            with modes_kept(model, training), torch.no_grad(), torch.random.fork_rng():
                model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
    return seen


def _trace_modes(module: nn.Module, leaves: set[nn.Module], seen: Optional[Inputs]) -> PreparedModel:
    """``module`` traced in both modes as a whole model is: the arguments that were None in the
    inputs it received in a mode are traced as None in that mode (``if position_bias is None:``
    takes the branch the model takes). Without example inputs, its None defaults are."""
    seen = seen or {}
    fallback = next(iter(seen.values()), ((), {}))  # a mode it was not called in: the other's
    inputs = {training: seen.get(training, fallback) for training in (True, False)}
    report = CaptureReport("symbolic")
    gm = trace_modes(module, inputs, report, lambda: _LeafTracer(leaves))
    gm.meta["qzo.capture"] = report
    return gm


def prepare_partially(model: nn.Module, args: Optional[tuple], kwargs: dict,
                      prepare_graph: Callable[[GraphModule, Optional[Inputs]], nn.Module],
                      ) -> tuple[nn.Module, PartialReport]:
    """``model`` (already a copy) with every traceable part prepared by ``prepare_graph``.

    A module outside ``untraceable`` traces with its untraceable descendants as leaves; it is
    prepared in graph mode and each of those leaves is visited in turn.
    """
    report = PartialReport()
    inputs = _record_inputs(model, args, kwargs) if args is not None else {}
    untraceable = untraceable_modules(model)
    leaves = {model.get_submodule(n) if n else model for n in untraceable}

    def run_eagerly(module: nn.Module, name: str, why: str) -> nn.Module:
        report.eager[name] = why
        for child_name, child in list(module.named_children()):
            if any(True for _ in child.parameters()):
                setattr(module, child_name, visit(child, f"{name}.{child_name}" if name else child_name))
        return module

    def visit(module: nn.Module, name: str) -> nn.Module:
        if name in untraceable:
            return run_eagerly(module, name, untraceable[name])
        if clash := graph_module_names(module):
            return run_eagerly(module, name, f"its attribute {clash[0]!r} is a name GraphModule uses")
        seen = inputs.get(module)
        if seen is None and args is not None:
            report.skipped[name] = "not called with the example inputs"
            return module
        try:
            gm = _trace_modes(module, leaves, seen)
        except Exception as error:
            # It traced in one mode only (``if not self.training and <a value>:`` is skipped in
            # train mode), or the branch its None arguments take does not trace: run it as it
            # is and prepare its parts.
            return run_eagerly(module, name, f"does not trace in both modes (or with its None arguments as "
                                             f"None): {_reason(error)}")
        inner = sorted({str(n.target) for graph in gm.qzo_mode_graphs.values() for n in graph.nodes
                        if n.op == "call_module" and gm.get_submodule(str(n.target)) in leaves})
        report.graph.append(name)
        prepared = prepare_graph(gm, seen)
        for path in inner:
            prepared.set_submodule(path, visit(prepared.get_submodule(path), f"{name}.{path}" if name else path))
        return prepared

    return visit(model, ""), report
