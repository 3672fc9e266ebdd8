"""What torch.export is given, and what it made of it: the example inputs, the dynamic
dimensions asked for, the flags bound for the capture, and the dimensions it fixed.

Capture and ONNX export ask for the same dynamic dimensions (:func:`auto_dims`): the batch of
every input; the sequence of token inputs (integer tensors); every dimension of 2-D and 3-D float
inputs (audio, embedded sequences, Conv1d signals, a time-major RNN's batch on axis 1), where the
weights that read a feature or channel axis fix it themselves (a ``Dim.AUTO`` dimension the model
fixes is taken as static). Images keep their height and width.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator, Sequence, Union

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["DynamicShapes", "auto_dims", "export_spec", "constant_keywords", "keywords_bound", "distinct_tensors",
           "input_dims", "input_dtypes", "fixed_token_dims", "call_checked_dims"]

# "auto", False (the example's shapes), or a torch.export dynamic_shapes spec.
DynamicShapes = Union[str, bool, Any]


def auto_dims(value: Any, sequence: bool = True) -> Any:
    """The dynamic dimensions of one example tensor (see the module docstring); with
    ``sequence=False`` the batch only."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    if sequence and value.is_floating_point() and value.dim() <= 3:
        return dict.fromkeys(range(value.dim()), torch.export.Dim.AUTO)
    dims = {0: torch.export.Dim.AUTO}
    if sequence and value.dim() >= 2 and not value.is_floating_point():
        dims[1] = torch.export.Dim.AUTO
    return dims


def export_spec(model: nn.Module, args, kwargs, dynamic: DynamicShapes):
    """torch.export's ``dynamic_shapes`` for these inputs (keyed by argument name with kwargs)."""
    if dynamic is False or dynamic is None:
        return None
    if dynamic != "auto":
        return dynamic
    if not kwargs:
        return tree_map(auto_dims, tuple(args))
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:len(args)]
    return {**{n: tree_map(auto_dims, a) for n, a in zip(names, args)},
            **{k: tree_map(auto_dims, v) for k, v in kwargs.items()}}


def constant_keywords(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The example keywords that hold no tensor and reach the forward through ``**kwargs``
    (Hugging Face's ``output_hidden_states=True``, ``return_dict=False``)."""
    parameters = inspect.signature(model.forward).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return {}
    return {k: v for k, v in kwargs.items()
            if k not in parameters and not any(isinstance(t, torch.Tensor) for t in tree_leaves(v))}


@contextlib.contextmanager
def keywords_bound(model: nn.Module, constants: dict[str, Any]) -> Iterator[None]:
    """The forward with ``constants`` bound, for a while. torch.export cannot give dynamic shapes
    beside keywords that go through ``**kwargs`` (it fails matching the spec to them); the
    prepared model takes them back at each call (``PreparedModel.__call__``)."""
    if not constants:
        yield
        return
    model.forward = functools.partial(model.forward, **constants)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


def distinct_tensors(inputs: Any) -> Any:
    """``inputs`` with every tensor that appears a second time replaced by a copy.

    torch.export takes two arguments that are one tensor object as one input, so the graph reads
    the first wherever either is used. ``example_kwargs={"labels": ids}`` next to ``(ids,)``, the
    usual causal-LM example, would give a model that embeds its labels."""
    seen: set[int] = set()

    def distinct(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in seen:
            return value.clone()
        seen.add(id(value))
        return value

    return tree_map(distinct, inputs)


def input_dims(module: GraphModule) -> dict[str, tuple[Any, ...]]:
    """Each tensor input's dimensions as the exported graph has them: an int where torch.export
    fixed the size, None where it is dynamic."""
    return {n.name: tuple(int(d) if is_concrete_int(d) else None for d in n.meta["val"].shape)
            for n in module.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}


def call_checked_dims(module: GraphModule, forward_names: Sequence[str]) -> dict[str, dict[int, int]]:
    """The dimensions a call must match, by forward argument name: those :func:`auto_dims` asks to
    keep dynamic (the batch; the sequence of integer inputs; every axis of floats up to 3-D) where
    the exported graph fixed them to a size other than 1. A Python loop over a sequence unrolled at
    capture runs at other lengths and returns the example's steps, so such a call is refused up
    front. An image's height and width (never asked to vary) and sizes of 1 (torch.export's own
    specialization of an example of 1) are left to the graph, which may take other sizes.
    Placeholders are renamed where torch.fx takes a name (``input`` becomes ``input_1``), so they
    are matched by position when the graph has one per forward parameter."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    names = list(forward_names) if len(forward_names) == len(placeholders) else [n.name for n in placeholders]
    checked: dict[str, dict[int, int]] = {}
    for name, node in zip(names, placeholders):
        value = node.meta.get("val")
        axes = auto_dims(value) if isinstance(value, torch.Tensor) else None
        fixed = {axis: int(value.shape[axis]) for axis in axes or ()
                 if is_concrete_int(value.shape[axis]) and int(value.shape[axis]) != 1}
        if fixed:
            checked[name] = fixed
    return checked


def input_dtypes(module: GraphModule) -> dict[str, torch.dtype]:
    """Each tensor input's dtype in the exported graph (its guards refuse any other)."""
    return {n.name: n.meta["val"].dtype for n in module.graph.nodes
            if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}


def fixed_token_dims(module: GraphModule, spec: Any, dims: dict[str, tuple[Any, ...]]) -> dict[str, str]:
    """The dimensions of integer (token) inputs that were asked to be dynamic and came out fixed.

    Dim.AUTO lets torch.export fix a dimension the model branches on or reshapes by (a sequence
    of exactly 8), or one of size 1 in the example, without an error. A float input's feature
    axis is fixed by the weights that read it, as expected, so floats are not reported."""
    names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    requested = spec if isinstance(spec, dict) else dict(zip(names, spec))
    fixed = {}
    for node in module.graph.nodes:
        asked, value = requested.get(node.name), node.meta.get("val")
        if node.op != "placeholder" or not isinstance(asked, dict) or not isinstance(value, torch.Tensor) \
                or value.is_floating_point():
            continue
        lost = [f"dim {d} = {dims[node.name][d]}" for d in asked
                if d < len(dims[node.name]) and dims[node.name][d] is not None]
        if lost:
            fixed[node.name] = ", ".join(lost)
    return fixed
