"""Parity between ONNX Runtime and the eval-mode PyTorch model, in quantization steps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from qzo_fx.exporters.runtime import onnx_session

__all__ = ["verify_onnx", "ParityReport", "OutputParity"]


@dataclass
class OutputParity:
    max_abs_diff: float
    step: float          # the output quantization step the difference is measured in
    steps: float         # max_abs_diff / step
    ok: bool


@dataclass
class ParityReport:
    outputs: list[OutputParity]
    provider: str
    tolerance_steps: float

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def __str__(self) -> str:
        parts = ", ".join(f"max |diff| {o.max_abs_diff:.3g} = {o.steps:.3f} steps" for o in self.outputs)
        return f"parity {'OK' if self.ok else 'FAILED'} on {self.provider}: {parts} (tolerance {self.tolerance_steps} step)"


def _step(reference: np.ndarray, bits: int = 8) -> float:
    # No quantizer sits on a model's output: measure in the step of an 8-bit grid over its range.
    return max(float(np.abs(reference).max()), 1e-12) / (2 ** (bits - 1) - 1)


def verify_onnx(qm: nn.Module, path: Union[str, Path], inputs: Sequence[Any], *, target: str = "cpu",
                tolerance_steps: float = 1.0) -> ParityReport:
    """Run ``path`` in ONNX Runtime and compare with ``qm`` in eval mode on the same inputs.

    The difference of each output is reported in units of the step of an 8-bit symmetric grid
    over that output's range (the model's own output is not quantized).
    """
    was_training = qm.training
    qm.eval()
    try:
        with torch.no_grad():
            expected = [t.numpy() for t in tree_leaves(qm(*inputs)) if isinstance(t, torch.Tensor)]
    finally:
        qm.train(was_training)
    session = onnx_session(path, target)
    feeds = {meta.name: t.numpy() for meta, t in zip(session.get_inputs(), [a for a in inputs if isinstance(a, torch.Tensor)])}
    got = session.run(None, feeds)
    outputs = []
    for ref, out in zip(expected, got):
        diff = float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()) if ref.size else 0.0
        step = _step(ref)
        outputs.append(OutputParity(diff, step, diff / step, diff <= tolerance_steps * step))
    return ParityReport(outputs, session.get_providers()[0], tolerance_steps)
