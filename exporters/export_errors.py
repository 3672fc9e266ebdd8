"""Export failures as :class:`~qzo_fx.errors.ExportError` naming the model's module and line.

torch.export and torch.onnx fail deep inside their passes ("Cannot view a tensor with shape ...",
"Error when translating node %kthvalue"). The error a user gets leads with where it happened in
their model: the failing node of the exported program is traced back, through the stack trace
into the lowered GraphModule's generated code, to the FX node and its module path
(``nn_module_stack``); a torch.export failure names the model line torch reports. torch's text
follows.
"""
from __future__ import annotations

import re
from typing import Optional

import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.errors import ExportError

__all__ = ["OnnxStageError", "export_failure"]

_CALL_SITE = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')
_FAILING_NODE = re.compile(r"(?:While executing|Error when translating node) %(\w+)")
# torch.export flattens outputs with pytree: an object of another class cannot be an output.
_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")
_GENERATED_LINE = re.compile(r'File "<eval_with_key>[^"]*", line \d+, in forward\n\s*(\w+) = ')


class OnnxStageError(Exception):
    """torch.export succeeded and torch.onnx failed on ``program`` (the cause is chained)."""

    def __init__(self, program) -> None:
        super().__init__("torch.onnx failed on the exported program")
        self.program = program


def _module_of(lowered: GraphModule, program, node_name: str) -> Optional[str]:
    """"module 'path' (Type)" of the model code that produced ``node_name`` of the exported program."""
    node = next((n for n in program.graph.nodes if n.name == node_name), None)
    if node is None:
        return None
    fx_nodes = {n.name: n for m in lowered.modules() if isinstance(m, GraphModule) for n in m.graph.nodes}
    candidates = _GENERATED_LINE.findall(node.meta.get("stack_trace") or "")[::-1]
    for name in candidates:
        stack = fx_nodes[name].meta.get("nn_module_stack") if name in fx_nodes else None
        if stack:
            return _describe(list(stack.values())[-1])
    stack = node.meta.get("nn_module_stack")
    return _describe(list(stack.values())[-1]) if stack else None


def _describe(entry: tuple) -> str:
    path, kind = entry
    name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    return f"module '{path}' ({name})"


def _where(lowered: GraphModule, error: Exception, text: str) -> str:
    returned = _UNKNOWN_OUTPUT.search(text)
    if returned:
        return f" (its output holds a {returned[1]})"
    site = _CALL_SITE.search(text)
    if site:
        return f" at {site[1]}:{site[2]} in {site[3]}: `{site[4].strip()}`"
    failing = _FAILING_NODE.search(text)
    if isinstance(error, OnnxStageError) and failing:
        module = _module_of(lowered, error.program, failing[1])
        op = next((str(n.target) for n in error.program.graph.nodes if n.name == failing[1]), failing[1])
        return f" in {module}, op {op}" if module else f", op {op}"
    return ""


def export_failure(qm: nn.Module, lowered: nn.Module, error: Exception) -> ExportError:
    """An ExportError that leads with the place, the cause and the way out; torch's text follows."""
    cause = error.__cause__ if isinstance(error, OnnxStageError) and error.__cause__ is not None else error
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause))
    chain, link = [], cause
    while link is not None:
        chain.append(type(link).__name__)
        link = link.__cause__
    where = _where(lowered, error, text)
    if _UNKNOWN_OUTPUT.search(text):
        hint = ("an ONNX file returns tensors, and torch.export flattens only tuples, lists, dicts, dataclasses "
                "and classes registered with torch.utils._pytree.register_pytree_node. Return tensors (for a "
                "Hugging Face cache: pass use_cache=False), or register that class, then export again")
    elif "GuardOnDataDependentSymNode" in chain or "data-dependent" in text:
        hint = ("the model branches in Python on a tensor's value, and an ONNX graph has no Python branches. "
                "Rewrite the branch with torch.cond (both sides traced) or torch.where (both computed), "
                "then export again; training with qzo_fx works as it is")
    elif isinstance(error, OnnxStageError):
        hint = ("torch.onnx has no translation for that op or failed on it: replace it in that module by ops "
                "ONNX has (or keep the module out of the exported part), then export again")
    else:
        hint = "qzo_fx.examine(model, example_inputs) lists the constructs that cannot be captured"
    return ExportError(f"torch.onnx could not export {type(qm).__name__}{where}: {hint}.\n\n{text}")
