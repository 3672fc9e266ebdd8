"""``train_step(..., compile=True)``: torch.compile for the base pass and the branch forwards.

What is compiled is what runs the model: the module the base pass calls (forward and, through
AOTAutograd, backward) and, in the branches, the module or branch graph each strategy calls
(``inplace`` and ``lean`` on an FSDP model: the model itself, under no_grad; ``sequential``: its
branch graph). The step's own tensor work around them -- noise, directions, the estimate, the
weight prologue -- stays as it is: it is a few passes over the parameters, and the noise kernels
are outside what torch.compile traces. Each callable is compiled on its first call (that call
pays for the compilation) and again only where dynamo's guards ask (grad mode, a new shape).

Random ops: unless ``mode`` is given, inductor is told to call torch's own random kernels
(``fallback_random``), so that a branch that replays the base pass's generator state sees the
base pass's dropout masks, as in eager mode.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch

from qzo_fx.errors import TrainStepError

__all__ = ["Compiler", "CompileSetting"]

CompileSetting = Union[bool, dict]


class Compiler:
    """Compiles callables once each (``enabled=False``: gives them back unchanged).

    Args:
        setting: False, True, or the keyword arguments of ``torch.compile`` (e.g.
            ``{"mode": "max-autotune-no-cudagraphs"}``, ``{"backend": "aot_eager"}``).

    Example:
        >>> Compiler(False)(len) is len
        True
    """

    def __init__(self, setting: CompileSetting = False) -> None:
        if not isinstance(setting, (bool, dict)):
            raise TrainStepError(f"compile={setting!r} is invalid: allowed False, True or a dict of torch.compile "
                                 "keyword arguments.")
        self.enabled = bool(setting) if isinstance(setting, bool) else True
        self.options: dict[str, Any] = dict(setting) if isinstance(setting, dict) else {}
        if self.enabled and "mode" not in self.options and self.options.get("backend", "inductor") == "inductor":
            options = dict(self.options.get("options", {}))
            options.setdefault("fallback_random", True)  # eager's dropout masks in every graph
            self.options["options"] = options
        self._compiled: dict[Any, Callable] = {}

    def check(self, strategy: str, graph_lean: bool = True) -> None:
        """Refuse the strategies that run the model where torch.compile cannot (``graph_lean``:
        ``lean`` streams through its graph, i.e. the model is not sharded)."""
        if not self.enabled or not (strategy == "batched" or (strategy == "lean" and graph_lean)):
            return
        why = ("runs its branch graph under torch.func.vmap" if strategy == "batched" else
               "draws each tensor's noise inside the graph (numba or seeded generators), which dynamo cannot trace")
        raise TrainStepError(f"compile=True with strategy={strategy!r}: it {why}. Use 'sequential', 'inplace' or "
                             "'auto' (which then chooses between those two), or compile=False.")

    def __call__(self, fn: Callable) -> Callable:
        if not self.enabled:
            return fn
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = self._compiled[fn] = torch.compile(fn, **self.options)
        return compiled
