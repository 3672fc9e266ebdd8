"""Parity between ONNX Runtime and the eval-mode PyTorch model, in quantization steps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from qzo_fx.exporters.runtime import onnx_session
from qzo_fx.modes import mode

__all__ = ["verify_onnx", "ParityReport", "OutputParity"]


@dataclass
class OutputParity:
    max_abs_diff: float
    step: float          # the output quantization step the difference is measured in
    steps: float         # max_abs_diff / step
    ok: bool


@dataclass
class ParityReport:
    """``outputs``: the file's ONNX semantics (ORT without numerics-changing rewrites) against the
    model: the pass/fail check. ``fused_steps``: the largest difference, in output steps, of ORT at
    full optimization, whose fused integer kernels (QLinearConv, QLinearAdd, ...) requantize with
    their own rounding: information, since one-step flips can grow through deep networks."""

    outputs: list[OutputParity]
    provider: str
    tolerance_steps: float
    fused_steps: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def __str__(self) -> str:
        parts = ", ".join(f"max |diff| {o.max_abs_diff:.3g} = {o.steps:.3f} steps" for o in self.outputs)
        return (f"parity {'OK' if self.ok else 'FAILED'} on {self.provider}: {parts} (tolerance "
                f"{self.tolerance_steps} step); fused integer kernels: {self.fused_steps:.3f} steps")


_MIN_STEP = 1e-6  # outputs that are all ~0 (zero-initialised heads) are compared in absolute terms


def _step(reference: np.ndarray, bits: int = 8) -> float:
    # No quantizer sits on a model's output: measure in the step of an 8-bit grid over its range.
    return max(float(np.abs(reference).max()) / (2 ** (bits - 1) - 1), _MIN_STEP)


def verify_onnx(qm: nn.Module, path: Union[str, Path], inputs: Sequence[Any], *, target: str = "cpu",
                tolerance_steps: float = 1.0, kwargs: Optional[dict[str, Any]] = None) -> ParityReport:
    """Run ``path`` in ONNX Runtime and compare with ``qm`` in eval mode on the same inputs.

    The difference of each output is reported in units of the step of an 8-bit symmetric grid
    over that output's range (the model's own output is not quantized). Pass/fail uses the file's
    exact ONNX semantics; the deviation of ORT's fused integer kernels is reported beside it.
    """
    kwargs = dict(kwargs or {})
    with mode(qm, False), torch.no_grad():
        expected = [t.numpy() for t in tree_leaves(qm(*inputs, **kwargs)) if isinstance(t, torch.Tensor)]
    tensors = [a for a in list(inputs) + list(kwargs.values()) if isinstance(a, torch.Tensor)]

    def compare(session) -> list[OutputParity]:
        feeds = {meta.name: t.numpy() for meta, t in zip(session.get_inputs(), tensors)}
        rows = []
        for ref, out in zip(expected, session.run(None, feeds)):
            diff = float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()) if ref.size else 0.0
            step = _step(ref)
            rows.append(OutputParity(diff, step, diff / step, diff <= tolerance_steps * step))
        return rows

    exact = onnx_session(path, target, exact=True)
    fused = onnx_session(path, target)
    return ParityReport(compare(exact), exact.get_providers()[0], tolerance_steps,
                        fused_steps=max((o.steps for o in compare(fused)), default=0.0))
