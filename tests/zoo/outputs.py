"""Flatten whatever a model returns, and compare two such results.

Written here, apart from the library's own pytree handling, so that the zoo does not grade
qzo_fx with qzo_fx's code: tensors, tuples, lists, named tuples, dicts, Hugging Face
``ModelOutput`` and cache objects are walked by hand, each leaf named by its path
(``out.logits``, ``out.cache.layers[0].keys``, ``out[1]``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

Leaf = tuple[str, Any]  # (path, tensor or plain value)


def flatten(obj: Any, path: str = "out") -> list[Leaf]:
    """Every leaf of ``obj`` with its path; containers are recorded as ``(path, <Type>)`` too so
    that a changed structure (a ModelOutput that became a tuple) shows up."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return [(path, obj)]
    leaves: list[Leaf] = [(path, f"<{type(obj).__name__}>")]
    if isinstance(obj, Mapping):  # dict, OrderedDict, ModelOutput (its items skip None fields)
        for key, value in obj.items():
            leaves += flatten(value, f"{path}.{key}")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        for key in obj._fields:
            leaves += flatten(getattr(obj, key), f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            leaves += flatten(value, f"{path}[{i}]")
    elif type(obj) in pytree.SUPPORTED_NODES:  # a registered container (transformers' caches): its children
        children, _ = pytree.SUPPORTED_NODES[type(obj)].flatten_fn(obj)
        for i, value in enumerate(children):  # a number inside (a cache layer's length) is no tensor
            leaves += flatten(value, f"{path}<{i}>")
    elif isinstance(getattr(obj, "layers", None), list):  # transformers Cache: layers of keys/values
        for i, layer in enumerate(obj.layers):
            for key in ("keys", "values"):
                if isinstance(getattr(layer, key, None), torch.Tensor):
                    leaves += flatten(getattr(layer, key), f"{path}.layers[{i}].{key}")
    return leaves


def tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensor leaves of ``obj`` in order."""
    return [(p, v) for p, v in flatten(obj) if isinstance(v, torch.Tensor)]


def floating(obj: Any) -> list[torch.Tensor]:
    return [t for _, t in tensors(obj) if t.is_floating_point()]


def target_like(t: torch.Tensor) -> torch.Tensor:
    """A fixed N(0, 1) regression target of ``t``'s shape (the same for the same shape)."""
    gen = torch.Generator().manual_seed(t.numel())
    return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device)


def loss_of(output: Any) -> torch.Tensor:
    """A generic scalar loss: mean squared error of every floating output against a fixed random
    target, summed. (A target of zero would give zero gradients at a zero output, e.g. torchvision
    ViT's zero-initialised head.)"""
    return sum((t.float() - target_like(t)).pow(2).mean() for t in floating(output))


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    """``max|got - expected| / max|expected|`` in float64 (absolute where ``expected`` is 0)."""
    e, g = expected.detach().double(), got.detach().double()
    if e.numel() == 0:
        return 0.0
    finite = torch.isfinite(e)
    if not torch.equal(finite, torch.isfinite(g)) or not torch.equal(e[~finite], g[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(e[finite].abs().max()), 1e-12)
    return float((e[finite] - g[finite]).abs().max()) / scale


def compare(expected: Any, got: Any, rtol: float) -> list[str]:
    """Problems between two results: structure (paths and container types), then, for every path
    both have, shapes, dtypes and values (floating leaves within ``rtol`` relative error,
    everything else exactly). Empty: they agree."""
    ref, out = flatten(expected), flatten(got)
    problems = []
    if [p for p, _ in ref] != [p for p, _ in out] or [v for _, v in ref if isinstance(v, str)] != \
            [v for _, v in out if isinstance(v, str)]:
        missing = [p for p, _ in ref if p not in dict(out)]
        extra = [p for p, _ in out if p not in dict(ref)]
        if missing or extra:
            problems.append("structure differs: " + "; ".join(
                f"{what} {', '.join(paths[:3])}{f' and {len(paths) - 3} more' if len(paths) > 3 else ''}"
                for what, paths in (("missing", missing), ("unexpected", extra)) if paths))
        else:
            problems.append(f"structure differs: expected {_structure(ref)}, got {_structure(out)}")
    got_by_path = dict(out)
    for path, a in ref:
        if path in got_by_path and not _is_container(a):
            problem = _leaf_problem(path, a, got_by_path[path], rtol)
            if problem:
                problems.append(problem)
    return problems


def _is_container(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def _leaf_problem(path: str, a: Any, b: Any, rtol: float) -> str:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if not isinstance(a, torch.Tensor):
        return f"{path}: {a!r} vs {b!r}" if a != b else ""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.is_floating_point():
        err = relative_error(a, b)
        return f"{path}: relative error {err:.3g} > {rtol:g}" if not err <= rtol else ""
    return f"{path}: {int((a != b).sum())} of {a.numel()} values differ" if not torch.equal(a, b) else ""


def shapes(obj: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(p, tuple(t.shape)) for p, t in tensors(obj)]


def identical(a: Any, b: Any) -> bool:
    """Bit-identical results (NaN equal to NaN at the same place)."""
    fa, fb = flatten(a), flatten(b)
    if [p for p, _ in fa] != [p for p, _ in fb]:
        return False
    for (_, x), (_, y) in zip(fa, fb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(torch.nan_to_num(x, nan=0.0), torch.nan_to_num(y, nan=0.0)) \
                    or not torch.equal(x.isnan(), y.isnan()):
                return False
        elif x != y:
            return False
    return True


def output_step(reference: np.ndarray) -> float:
    """One step of an 8-bit symmetric grid over ``reference``'s range (absolute 1e-6 floor for
    outputs that are all ~0): the unit in which ONNX outputs are compared."""
    finite = reference[np.isfinite(reference)] if reference.size else reference
    return max(float(np.abs(finite).max()) / 127 if finite.size else 0.0, 1e-6)


def steps_apart(reference: np.ndarray, got: np.ndarray) -> float:
    """``max|got - reference|`` in output steps of ``reference``; inf for a shape or
    non-finite mismatch."""
    if reference.shape != got.shape:
        return float("inf")
    if not np.issubdtype(reference.dtype, np.floating):
        return 0.0 if np.array_equal(reference, got) else float("inf")
    r, g = reference.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r)
    if not np.array_equal(finite, np.isfinite(g)):
        return float("inf")
    if not finite.any():
        return 0.0
    return float(np.abs(r[finite] - g[finite]).max()) / output_step(reference)


def _structure(leaves: list[Leaf]) -> str:
    parts = [f"{p}:{v}" if isinstance(v, str) else f"{p}{list(v.shape)}" if isinstance(v, torch.Tensor)
             else f"{p}={v!r}" for p, v in leaves]
    text = ", ".join(parts)
    return text if len(text) < 300 else text[:300] + "..."
