"""Look at graphs: a table, readable code, unified diffs, networkx graphs and SVG pictures."""
from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path
from typing import Any, Union

import networkx as nx
import torch.nn as nn
from tabulate import tabulate
from torch.fx import GraphModule, Node

from qzo_fx.context import ANNOTATION_KEY, QUANTIZER_KEY
from qzo_fx.errors import QzoError

__all__ = ["print_tabular", "tabular", "graph_code", "graph_diff", "to_networkx", "draw_svg", "to_dot"]

CodeLike = Union[GraphModule, nn.Module, str]


def _target(node: Node) -> str:
    target = node.target
    if callable(target):
        name = getattr(target, "__name__", str(target))
        module = getattr(target, "__module__", "") or ""
        return f"{module.split('.')[-1]}.{name}" if module and not str(target).startswith("qzo.") else str(target)
    return str(target)


def _quant_note(node: Node) -> str:
    if QUANTIZER_KEY in node.meta:
        return f"quantizer={node.meta[QUANTIZER_KEY]}"
    annotation = node.meta.get(ANNOTATION_KEY)
    if annotation is None:
        return ""
    parts = []
    if annotation.weight is not None:
        parts.append(f"W{annotation.weight.bits} {annotation.weight.granularity} {annotation.weight.ste}")
    if annotation.activation is not None:
        parts.append(f"A{annotation.activation.bits}")
    return ", ".join(parts)


def _one_graph(gm: nn.Module, what: str) -> GraphModule:
    """``gm`` itself; a partially prepared model (an eager root with prepared parts) is refused
    with the parts to pass instead."""
    if isinstance(gm, GraphModule):
        return gm
    parts = [name for name, m in gm.named_modules() if isinstance(m, GraphModule) and name]
    hint = f" Pass one of its prepared parts, e.g. qm.get_submodule({parts[0]!r}) (all: {parts[:6]})." if parts else ""
    raise QzoError(f"{what} shows one graph, and {type(gm).__name__} is not a GraphModule (prepared partially, or "
                   f"not prepared).{hint}")


def tabular(gm: GraphModule) -> str:
    """The graph as a text table: opcode, name, target, args and the quantization note."""
    rows = [[n.op, n.name, _target(n), _short(n.args), _quant_note(n)] for n in _one_graph(gm, "tabular").graph.nodes]
    return tabulate(rows, headers=["opcode", "name", "target", "args", "qzo"])


def print_tabular(gm: GraphModule) -> None:
    """Print :func:`tabular`.

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(4, 2), qzo_fx.QuantConfig(weight_bits=4))
        >>> qzo_fx.print_tabular(qm)  # doctest: +ELLIPSIS
        opcode ...
    """
    print(tabular(gm))


def _short(args: Any, limit: int = 60) -> str:
    text = str(args)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def graph_code(model: CodeLike) -> str:
    """Readable Python of a graph (a module is symbolically traced first; a string passes through)."""
    if isinstance(model, str):
        return model
    if not isinstance(model, GraphModule):
        import torch.fx
        try:
            model = torch.fx.symbolic_trace(model)
        except Exception as error:
            raise QzoError(f"graph_code: {type(model).__name__} is not symbolically traceable ({error}); "
                           "pass a GraphModule (e.g. from qzo_fx.prepare) instead.") from error
    return model.code.strip() + "\n"


def graph_diff(before: CodeLike, after: CodeLike, context: int = 2) -> str:
    """Unified diff of the code of two graphs.

    Example:
        >>> import torch, qzo_fx
        >>> m = torch.nn.Linear(4, 2)
        >>> "+" in qzo_fx.graph_diff(m, qzo_fx.prepare(m))
        True
    """
    a, b = graph_code(before).splitlines(True), graph_code(after).splitlines(True)
    return "".join(difflib.unified_diff(a, b, "before", "after", n=context))


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """A DiGraph of the nodes; attributes ``op``, ``target`` and ``qzo`` (spec or quantizer)."""
    graph = nx.DiGraph()
    for node in _one_graph(gm, "to_networkx").graph.nodes:
        graph.add_node(node.name, op=node.op, target=_target(node), qzo=_quant_note(node))
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


_COLORS = {"placeholder": "#d0e8ff", "output": "#d0e8ff", "get_attr": "#eeeeee", "call_module": "#fff2cc"}


def to_dot(gm: GraphModule) -> str:
    """Graphviz DOT text of the graph; quantization nodes are drawn in orange."""
    lines = ["digraph G {", "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica, fontsize=10];"]
    for name, data in to_networkx(gm).nodes(data=True):
        color = "#ffcc99" if "qzo" in data["target"] else _COLORS.get(data["op"], "#ffffff")
        label = f"{name}\\n{data['target']}" + (f"\\n{data['qzo']}" if data["qzo"] else "")
        lines.append(f'  "{name}" [label="{label.replace(chr(34), chr(39))}", fillcolor="{color}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in to_networkx(gm).edges]
    return "\n".join(lines + ["}"]) + "\n"


def draw_svg(gm: GraphModule, path: Union[str, Path]) -> Path:
    """Draw the graph to an SVG file with Graphviz's ``dot``.

    Raises:
        QzoError: Graphviz is not installed (``apt-get install graphviz``, or ``conda install graphviz``).
    """
    dot = shutil.which("dot")
    if dot is None:
        raise QzoError("draw_svg needs Graphviz's `dot` program, which is not on PATH: install it "
                       "(apt-get install graphviz / brew install graphviz), or use to_dot() / to_networkx().")
    path = Path(path)
    result = subprocess.run([dot, "-Tsvg", "-o", str(path)], input=to_dot(gm), text=True, capture_output=True)
    if result.returncode != 0:
        raise QzoError(f"dot failed to draw {path}: {result.stderr.strip()}")
    return path
