"""Eval-mode BatchNorm calls in a graph, however they were captured.

A BatchNorm reaches a graph in three spellings: a ``call_module`` of ``nn.BatchNorm*d``
(symbolic capture of a plain model), ``F.batch_norm(x, mean, var, weight, bias, False, ...)``
(symbolic capture traced through a subclass such as timm's ``BatchNormAct2d``, whose own
``forward`` adds an activation) and ``aten.batch_norm(x, weight, bias, mean, var, False, ...)``
(torch.export). Folding and the folded-bias rounding treat them alike, so they read the call
through one description: which attributes hold the statistics and affine parameters.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from qzo_fx.capture.call_errors import FOLDED_KEY

__all__ = ["BatchNormSite", "batchnorm_site", "feeds_only", "folding_producer", "producer_bias", "set_producer_bias",
           "FOLDABLE_BATCHNORMS", "FOLDABLE_PRODUCERS"]

# Exact module types: subclasses (timm's BatchNormAct2d) add an activation a fold would drop;
# symbolic capture traces into those, and their F.batch_norm call is a site of its own.
FOLDABLE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The ops a BatchNorm folds into.
FOLDABLE_PRODUCERS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.ops.aten.conv1d.default,
                      torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default, torch.ops.aten.linear.default}

_F_SIGNATURE = inspect.signature(F.batch_norm)
_METADATA = {"ndim", "shape", "dtype", "device"}
_ATEN_ORDER = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")


@dataclass(frozen=True)
class BatchNormSite:
    """One eval-mode BatchNorm call: its input and the attribute paths of what it reads
    (``None`` where it has no affine weight or bias)."""

    node: Node
    input: Node
    mean: str
    var: str
    weight: Optional[str]
    bias: Optional[str]
    eps: float

    def tensors(self, gm: GraphModule) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(running_mean, running_var, weight, bias)`` as the graph module holds them now."""
        def read(path: Optional[str]) -> Optional[Tensor]:
            return None if path is None else operator.attrgetter(path)(gm)
        return read(self.mean), read(self.var), read(self.weight), read(self.bias)

    def reads(self, gm: GraphModule) -> list[Optional[Node]]:
        """New ``get_attr`` nodes of ``(running_mean, running_var, weight, bias)`` (None where
        absent), at the graph's insertion point: reads of their own, which passes that rewrite
        the original reads leave in place."""
        paths = (self.mean, self.var, self.weight, self.bias)
        return [None if path is None else gm.graph.get_attr(path) for path in paths]

    def replace_in_eval_graph(self, gm: GraphModule, value: Node, new_nodes: tuple[Node, ...]) -> None:
        """Give the BatchNorm's users ``value`` and drop the call. ``new_nodes`` take its module
        stack; a BatchNorm module that is no longer called in eval mode is recorded, so that its
        hooks are warned about."""
        for new in new_nodes:
            if "nn_module_stack" in self.node.meta:
                new.meta["nn_module_stack"] = self.node.meta["nn_module_stack"]
        if self.node.op == "call_module":
            gm.meta.setdefault(FOLDED_KEY, []).append(str(self.node.target))
        self.node.replace_all_uses_with(value)
        gm.graph.erase_node(self.node)

    @property
    def tag(self) -> str:
        """A name for buffers derived from this BatchNorm."""
        return (str(self.node.target) if self.node.op == "call_module" else self.node.name).replace(".", "_")


def _module_site(gm: GraphModule, node: Node) -> Optional[BatchNormSite]:
    bn = gm.get_submodule(str(node.target))
    if type(bn) not in FOLDABLE_BATCHNORMS or bn.running_mean is None or bn.running_var is None:
        return None
    if not node.args or not isinstance(node.args[0], Node):
        return None
    prefix = str(node.target)
    affine = [f"{prefix}.{name}" if getattr(bn, name) is not None else None for name in ("weight", "bias")]
    return BatchNormSite(node, node.args[0], f"{prefix}.running_mean", f"{prefix}.running_var", *affine, float(bn.eps))


def _call_arguments(node: Node) -> Optional[dict]:
    if node.target is F.batch_norm:
        try:
            bound = _F_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return dict(bound.arguments)
    if node.target is torch.ops.aten.batch_norm.default and len(node.args) >= len(_ATEN_ORDER):
        return dict(zip(_ATEN_ORDER, node.args))
    return None


def _attribute(value: object, optional: bool) -> tuple[bool, Optional[str]]:
    """``(readable, path)``: a ``get_attr`` read gives its path; ``None`` is readable when optional."""
    if value is None:
        return optional, None
    if isinstance(value, Node) and value.op == "get_attr":
        return True, str(value.target)
    return False, None


def _function_site(node: Node) -> Optional[BatchNormSite]:
    arguments = _call_arguments(node)
    if arguments is None or arguments["training"] is not False or not isinstance(arguments["input"], Node):
        return None
    paths = []
    for name, optional in (("running_mean", False), ("running_var", False), ("weight", True), ("bias", True)):
        readable, path = _attribute(arguments[name], optional)
        if not readable:
            return None
        paths.append(path)
    eps = arguments["eps"]
    return None if not isinstance(eps, float) else BatchNormSite(node, arguments["input"], *paths, eps)


def batchnorm_site(gm: GraphModule, node: Node) -> Optional[BatchNormSite]:
    """The BatchNorm ``node`` is, when it normalizes with running statistics held as attributes.

    A ``call_module`` BatchNorm normalizes as its module's mode says when it runs; a functional
    call only when its ``training`` argument is ``False``.

    Example:
        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))
        >>> [batchnorm_site(gm, n).mean for n in gm.graph.nodes if batchnorm_site(gm, n) is not None]
        ['1.running_mean']
    """
    if node.op == "call_module":
        return _module_site(gm, node)
    if node.op == "call_function":
        return _function_site(node)
    return None


def _reads_metadata(user: Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) > 1 and user.args[1] in _METADATA
    return user.op == "call_method" and user.target in ("size", "dim")


def feeds_only(producer: Node, node: Node) -> bool:
    """True when ``node`` is the only user of ``producer``'s values: other users read only its
    shape (timm's ``BatchNormAct2d`` asserts ``x.ndim``), which a fold into ``producer`` keeps."""
    return all(user is node or _reads_metadata(user) for user in producer.users)


def folding_producer(site: BatchNormSite) -> Optional[Node]:
    """The conv/linear ``site`` normalizes, when a fold into it keeps every other use of its values."""
    producer = site.input
    if producer.target not in FOLDABLE_PRODUCERS or len(producer.args) < 2 or not feeds_only(producer, site.node):
        return None
    return producer


def producer_bias(producer: Node) -> object:
    """The bias argument of a conv/linear call (positional or keyword; None when absent)."""
    return producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")


def set_producer_bias(producer: Node, bias: object) -> None:
    if len(producer.args) > 2 or "bias" not in producer.kwargs:
        args = list(producer.args) + [None] * (3 - len(producer.args))
        args[2] = bias
        producer.args = tuple(args)
    else:
        producer.update_kwarg("bias", bias)
