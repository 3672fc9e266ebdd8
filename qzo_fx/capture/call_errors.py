"""Why a call to a prepared model failed, in the user's terms.

A captured graph takes what prepare's examples were: those inputs (and flags bound at capture),
shapes that were dynamic at capture, float32 parameters. A call outside that fails deep inside
the graph with a reshape or dtype error; these checks, run only after a call failed, say which
of the three it was and how to get past it.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import Graph

from qzo_fx.errors import InputError

__all__ = ["take_constant_keywords", "check_fixed_dims", "why_call_failed", "integer_inputs_widened",
           "check_inputs_fit", "uncalled_modules", "warn_hooks_that_cannot_run", "FOLDED_IN_EVAL", "FOLDED_KEY"]

# gm.meta key: the BatchNorm modules the eval graph computes folded or as a multiply-add (so never calls).
FOLDED_KEY = "qzo.folded_batchnorms"

LOW_PRECISION = (torch.float16, torch.bfloat16)


def take_constant_keywords(name: str, kwargs: dict[str, Any], constants: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the flags the graph was captured with (they are part of it); a flag
    given another value than at capture cannot be honoured."""
    for key, value in constants.items():
        if key in kwargs and kwargs[key] != value:
            raise InputError(f"{name} (prepared) was captured with {key}={value!r}, which is part of its graph; this "
                             f"call passes {key}={kwargs[key]!r}. Prepare again with {key}={kwargs[key]!r} in "
                             "example_kwargs.")
    return {k: v for k, v in kwargs.items() if k not in constants}


def check_fixed_dims(model: nn.Module, report: Any, args: tuple, kwargs: dict) -> None:
    """Raise :class:`InputError` when the call gives an input dimension another size than the
    exported graph fixed. Checked before the call: a graph specialized to a size does not always
    fail at another one (a Python loop over a sequence, unrolled at capture, runs its example's
    steps and returns a shorter output)."""
    dims = getattr(report, "checked_dims", None)
    fixed = _fixed_dim_mismatch(model.forward, dims, args, kwargs) if dims else None  # no binding when none
    if fixed:
        raise InputError(f"{type(model).__name__} (prepared) takes {fixed}: that size was fixed at capture "
                         f"({getattr(report, 'shapes', '')}; prepare() warned why). Call it with that size, or "
                         "prepare it with dynamic_shapes=... naming the dimensions that vary.")


def why_call_failed(model: nn.Module, report: Any, args: tuple, kwargs: dict, error: Exception) -> Optional[str]:
    """What about the call the graph cannot take (``None`` when the call fits it)."""
    dims = {name: {axis: size for axis, size in enumerate(sizes) if size is not None}
            for name, sizes in (getattr(report, "input_dims", None) or {}).items()}
    fixed = _fixed_dim_mismatch(model.forward, dims, args, kwargs)
    if fixed:
        return (f"takes {fixed}: that size was fixed at capture ({getattr(report, 'shapes', '')}). Call it with "
                "that size, or prepare it with dynamic_shapes=... naming the dimensions that vary.")
    dtype = _dtype_mismatch(model.forward, getattr(report, "input_dtypes", None) or {}, args, kwargs)
    if dtype:
        return f"takes {dtype}: the graph was captured with that dtype. Pass the inputs in the example's dtypes."
    low = next((p.dtype for p in model.parameters() if p.dtype in LOW_PRECISION), None)
    if low is not None:
        return (f"failed with {low} parameters: its quantizers compute in float32. Keep it in float32 (qm.float()) "
                "and run it under torch.autocast(device_type, dtype=torch.bfloat16) for low-precision speed.")
    refused = _refused_arguments(model.forward, args, kwargs) if isinstance(error, TypeError) else None
    if refused is None:
        return None
    return (f"was called with arguments its captured graph does not take: {refused}. The graph takes "
            f"{_signature_text(model.forward)}, the inputs of prepare()'s examples. Call it with those, or prepare "
            "again with the inputs you will pass (an attention_mask, labels) among example_inputs / example_kwargs.")


def check_inputs_fit(model: nn.Module, args: tuple, kwargs: dict, where: str) -> None:
    """Raise :class:`InputError` when ``model`` (a prepared model) cannot take ``args`` and
    ``kwargs``, naming what its graph takes (an export or a check would fail on it deep inside)."""
    refused = _refused_arguments(model.forward, args, kwargs)
    if refused is not None:
        raise InputError(f"{where}: {type(model).__name__} (prepared) takes {_signature_text(model.forward)}, the "
                         f"inputs of prepare()'s examples, and these inputs do not fit: {refused}. Pass the same "
                         "inputs (a file without labels: prepare with examples that leave them out).")


def _fixed_dim_mismatch(forward: Callable[..., Any], dims: dict[str, dict[int, int]], args: tuple,
                        kwargs: dict) -> Optional[str]:
    """The first input dimension the call gives another size than the graph fixed
    (``dims``: input name -> axis -> size)."""
    bound = _bound_arguments(forward, args, kwargs)
    for name, expected in dims.items():
        value = bound.get(name)
        if not isinstance(value, Tensor):
            continue
        for axis, size in expected.items():
            if axis < value.dim() and value.shape[axis] != size:
                return f"'{name}' with dimension {axis} of size {size} only, and this call has {value.shape[axis]}"
    return None


def integer_inputs_widened(names: tuple[str, ...], dtypes: dict[str, torch.dtype], args: tuple,
                           kwargs: dict) -> tuple[tuple, dict]:
    """The call with each integer tensor converted to the integer dtype its input was captured
    with, where that dtype holds every value of the given one (``names``: the graph's forward
    parameters, in order)."""
    def widened(name: str, value: Any) -> Any:
        expected = dtypes.get(name)
        if expected is None or not isinstance(value, Tensor) or value.dtype == expected:
            return value
        return value.to(expected) if _holds(expected, value.dtype) else value

    return (tuple(widened(n, v) for n, v in zip(names, args)) + args[len(names):],
            {n: widened(n, v) for n, v in kwargs.items()})


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    integer = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if wide not in integer or narrow not in integer:
        return False
    return torch.iinfo(wide).min <= torch.iinfo(narrow).min and torch.iinfo(narrow).max <= torch.iinfo(wide).max


def _dtype_mismatch(forward: Callable[..., Any], dtypes: dict[str, torch.dtype], args: tuple,
                    kwargs: dict) -> Optional[str]:
    bound = _bound_arguments(forward, args, kwargs)
    for name, expected in dtypes.items():
        value = bound.get(name)
        if isinstance(value, Tensor) and value.dtype != expected:
            return f"'{name}' as {expected}, and this call passes {value.dtype}"
    return None


def _bound_arguments(forward: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name; empty when they do not bind (another check says why)."""
    try:
        return dict(inspect.signature(forward).bind(*args, **kwargs).arguments)
    except TypeError:
        return {}


def _refused_arguments(forward: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[str]:
    try:
        inspect.signature(forward).bind(*args, **kwargs)
    except TypeError as error:
        return str(error)
    return None


def _signature_text(forward: Callable[..., Any]) -> str:
    return "(" + ", ".join(inspect.signature(forward).parameters) + ")"


def uncalled_modules(model: nn.Module, graphs: list[Graph]) -> list[tuple[str, nn.Module]]:
    """Leaf modules of the tree that no graph calls: prepare turned their forward into graph ops
    (a quantized Linear becomes a fake-quantized weight and a linear op)."""
    called = {str(n.target) for g in graphs for n in g.nodes if n.op == "call_module"}
    return [(name, m) for name, m in model.named_modules()
            if name and name not in called and next(m.children(), None) is None and "qzo_quant" not in name]


_GRAPH_OPS = "computes this layer with graph ops (its weight fake-quantized), not by calling the module"
FOLDED_IN_EVAL = ("in eval mode computes this BatchNorm as the exported file does (folded into the conv or "
                  "linear before it, or as a per-channel multiply-add), not by calling the module")


def warn_hooks_that_cannot_run(modules: list[tuple[str, nn.Module]], warned: set[str], why: str = _GRAPH_OPS) -> None:
    """Warn once per module about forward hooks that will never be called (``why``: how the graph
    computes the module instead)."""
    for name, module in modules:
        if (module._forward_hooks or module._forward_pre_hooks) and name not in warned:
            warned.add(name)
            warnings.warn(f"forward hooks on '{name}' ({type(module).__name__}) will not run: the prepared graph "
                          f"{why}. Hook a module the graph calls (call_module nodes in qzo_fx.graph_code(qm)), or "
                          "the model before prepare() where the float model is what you observe.",
                          UserWarning, stacklevel=4)
