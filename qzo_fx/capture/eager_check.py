"""Whether the user's model itself runs on the example inputs, and where it fails if not.

``prepare`` runs the model (tracing, calibration, recording submodule inputs), so an example
that the float model cannot take (a wrong image size, a sequence its reshapes do not divide)
used to surface as a raw error from deep inside torch or as a failed pass. When preparing
fails, this runs a copy of the model eagerly on the same inputs: if that fails too, the inputs
are the problem, and the error names the innermost module that raised.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from qzo_fx.capture.copying import copy_model

__all__ = ["eager_failure"]


def eager_failure(model: nn.Module, args: Optional[tuple], kwargs: dict[str, Any]) -> Optional[str]:
    """``None`` if a copy of ``model`` runs on ``(args, kwargs)`` in its own mode, else a line
    naming the innermost module that raised and the error. The model itself is not run: its
    BatchNorm statistics and RNG draws stay as they are."""
    if args is None and not kwargs:
        return None  # no example: prepare traced symbolically, nothing to run
    try:
        probe = copy_model(model)
    except Exception:
        return None  # prepare reports an uncopyable model itself
    names = {module: name for name, module in probe.named_modules()}
    stack: list[nn.Module] = []  # the modules running now, innermost last

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    rng = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            probe(*(args or ()), **kwargs)
    except Exception as error:  # the raising module's forward hook never ran: it is on top
        module = stack[-1] if stack else probe
        where = names[module] or "its top-level forward"
        message = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
        return f"in {where} ({type(module).__name__}): {type(error).__name__}: {message}"
    finally:
        for handle in handles:
            handle.remove()
        torch.random.set_rng_state(rng)
    return None
