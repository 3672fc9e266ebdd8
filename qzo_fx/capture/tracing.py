"""Capture: turn an ``nn.Module`` into a ``GraphModule``.

Order: ``torch.fx.symbolic_trace`` (keeps modules and readable code); when that fails and
example inputs are given, ``torch.export`` (ATen graph, handles data-dependent Python). The
first step of the pipeline, so it takes a module rather than a graph.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.errors import CaptureError

__all__ = ["capture", "CaptureReport", "CAPTURE_METHODS"]

CAPTURE_METHODS = ("auto", "symbolic", "export")


@dataclass
class CaptureReport:
    method: str
    failures: dict[str, str] = field(default_factory=dict)


def _symbolic(model: nn.Module, args, kwargs) -> GraphModule:
    return torch.fx.symbolic_trace(model)


def _export(model: nn.Module, args, kwargs) -> GraphModule:
    if args is None:
        raise CaptureError("torch.export needs example_inputs; pass example_inputs=(x,) to prepare().")
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        # Hugging Face models: a KV cache object in the output cannot be exported or trained
        # through. The model here is prepare's own copy, so the user's config is untouched.
        config.use_cache = False
    # A failed export logs and prints the partial graph; the reason goes into the report instead.
    quiet = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._dynamo")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, tuple(args), kwargs=dict(kwargs or {}), strict=False).module()
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


_CAPTURERS = {"symbolic": _symbolic, "export": _export}


def capture(model: nn.Module, example_inputs: Optional[tuple[Any, ...]] = None,
            example_kwargs: Optional[dict[str, Any]] = None, method: str = "auto") -> tuple[GraphModule, CaptureReport]:
    """Capture ``model`` (already a copy: capture may share its submodules)."""
    if method not in CAPTURE_METHODS:
        raise CaptureError(f"capture={method!r} is invalid: allowed {CAPTURE_METHODS}.")
    order = ["symbolic", "export"] if method == "auto" else [method]
    report = CaptureReport(method="")
    for name in order:
        try:
            gm = _CAPTURERS[name](model, example_inputs, example_kwargs)
        except CaptureError as error:
            report.failures[name] = str(error)
        except Exception as error:  # torch raises many types here; keep the reason, try the next
            report.failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            report.method = name
            return gm, report
    reasons = "; ".join(f"{k}: {v}" for k, v in report.failures.items())
    hint = " Pass example_inputs=(...) so torch.export can be tried." if example_inputs is None else ""
    raise CaptureError(f"Could not capture {type(model).__name__} ({reasons}).{hint}")
