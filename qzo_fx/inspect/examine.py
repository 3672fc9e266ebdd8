"""``examine``: what ``prepare`` would meet in a model, before anything is changed."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch.nn as nn
from tabulate import tabulate
from torch.fx import GraphModule

from qzo_fx.capture.copying import copy_model
from qzo_fx.capture.coverage import unquantized_weights
from qzo_fx.capture.mode_diff import mode_differences
from qzo_fx.capture.partial import untraceable_modules
from qzo_fx.capture.tracing import capture
from qzo_fx.config import QuantConfig
from qzo_fx.errors import CaptureError
from qzo_fx.example_inputs import positional_inputs
from qzo_fx.quant.op_table import MODULE_TYPES, op_signature

__all__ = ["examine", "ExamineReport", "Finding"]



@dataclass(frozen=True)
class Finding:
    kind: str        # "untraceable", "float weight", "capture", "mode-dependent", "shapes"
    where: str       # module or node name
    location: str    # source file:line of the construct
    detail: str      # what is wrong
    action: str      # what prepare does about it


@dataclass
class ExamineReport:
    plan: str
    quantizable: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [(f.kind, f.where or "<root>", f.location, f.detail[:90], f.action) for f in self.findings]
        table = tabulate(rows, headers=["kind", "where", "source", "detail", "prepare will"]) if rows else "no findings"
        return f"plan: {self.plan}\nquantizable ops: {len(self.quantizable)}\n{table}"


def _location(module: nn.Module) -> str:
    try:
        source = inspect.getsourcefile(type(module).forward) or "?"
        line = inspect.getsourcelines(type(module).forward)[1]
        return f"{source.split('site-packages/')[-1]}:{line}"
    except (TypeError, OSError):
        return "?"


def _float_weights(gm: GraphModule, model: nn.Module) -> list[Finding]:
    """The same rule prepare warns with: weights read by ops that have no quantization rule."""
    findings = []
    for weight in unquantized_weights(gm):
        owner = weight.name if _has_module(model, weight.name) else weight.name.rpartition(".")[0]
        location = _location(model.get_submodule(owner)) if _has_module(model, owner) else ""
        findings.append(Finding("float weight", weight.name, location,
                                f"{weight.op} has weights but no quantization rule", "keep its weights in float"))
    return findings


def examine(model: nn.Module, example_inputs: Optional[Sequence[Any]] = None, *,
            example_kwargs: Optional[dict[str, Any]] = None, config: Optional[QuantConfig] = None) -> ExamineReport:
    """List untraceable constructs, weights that will stay in float, what changes between train
    and eval mode (by module), which input dimensions stay dynamic, and the capture plan.

    Works on a copy: the model is not changed.

    Example:
        >>> import torch, qzo_fx
        >>> print(qzo_fx.examine(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LSTM(2, 2))).plan)
        graph mode (symbolic)
    """
    from qzo_fx.capture.pipeline import list_quantizers  # the pipeline imports the passes, which import this

    quantizers = list_quantizers(model)
    if quantizers:  # a prepared model: what prepare made of it, not a second capture of its fake-quant graph
        return ExamineReport(f"already prepared: {len(quantizers)} quantizers (examine the float model to see what "
                             "prepare meets in it; qzo_fx.list_quantizers(qm) lists these)",
                             [q.target for q in quantizers])
    model = copy_model(model)
    args = positional_inputs(example_inputs, "examine")
    try:
        gm, report = capture(model, args, dict(example_kwargs or {}), "auto")
    except CaptureError as error:
        findings = [Finding("capture", "", _location(model), str(error), "fall back to partial capture")]
        for name, reason in untraceable_modules(model).items():
            findings.append(Finding("untraceable", name, _location(model.get_submodule(name) if name else model),
                                    reason, "run eagerly; prepare its traceable children on their own"))
        # The traceable parts are prepared on their own: their quantizable layers are quantized.
        layers = [name for name, m in model.named_modules() if type(m) in MODULE_TYPES]
        return ExamineReport("partial capture (eager where untraceable, graph mode elsewhere)", layers, findings)
    modules = dict(gm.named_modules())
    quantizable = [n.name for n in gm.graph.nodes if op_signature(n, modules) is not None]
    findings = [Finding("capture", "", _location(model), f"{name}: {reason}", "use the next capture method")
                for name, reason in report.failures.items()]
    findings += _float_weights(gm, model)
    findings += [Finding("mode-dependent", d.where,
                         _location(model.get_submodule(d.where)) if _has_module(model, d.where) else "",
                         str(d).partition(": ")[2] or d.how,
                         "capture it in both modes; train()/eval() switch" if d.how == "captured per mode"
                         else "keep the module; it follows train()/eval()")
                 for d in mode_differences(gm)]
    if report.shapes:
        findings.append(Finding("shapes", "", "", f"dynamic: {report.shapes}",
                                "accept other input shapes" if "static" not in report.shapes
                                else "accept only the example's shapes"))
    return ExamineReport(f"graph mode ({report.method})", quantizable, findings)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
