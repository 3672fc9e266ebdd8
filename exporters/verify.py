"""Parity between ONNX Runtime and the eval-mode PyTorch model, in quantization steps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from qzo_fx.exporters.runtime import onnx_session
from qzo_fx.exporters.ties import activation_scale_names, probe_model, tie_resolved_outputs
from qzo_fx.capture.modes import mode

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
    model, with rounding ties followed as ORT broke them (see :mod:`qzo_fx.exporters.ties`): the
    pass/fail check. ``raw_steps``: the same difference without following ties. ``ties`` /
    ``unexplained``: activation codes that differ between torch and ORT with inputs equal to
    float precision / with inputs that really differ. ``fused_steps``: ORT at full optimization,
    whose fused integer kernels (QLinearConv, QLinearAdd, ...) requantize with their own rounding:
    information, since one-step flips can grow through deep networks."""

    outputs: list[OutputParity]
    provider: str
    tolerance_steps: float
    raw_steps: float = 0.0
    codes: int = 0
    ties: int = 0
    unexplained: int = 0
    fused_steps: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs) and not self.unexplained

    def __str__(self) -> str:
        parts = ", ".join(f"max |diff| {o.max_abs_diff:.3g} = {o.steps:.3f} steps" for o in self.outputs)
        return (f"parity {'OK' if self.ok else 'FAILED'} on {self.provider}: {parts} (tolerance "
                f"{self.tolerance_steps} step); {self.codes} activation codes: {self.ties} ties followed, "
                f"{self.unexplained} unexplained; without following ties: {self.raw_steps:.3f} steps; "
                f"fused integer kernels: {self.fused_steps:.3f} steps")


_PROTOBUF_LIMIT = 2**31 - 2**24  # a serialized ModelProto must stay under 2 GiB
_MIN_STEP = 1e-6  # outputs that are all ~0 (zero-initialised heads) are compared in absolute terms


def _step(reference: np.ndarray, bits: int = 8) -> float:
    # No quantizer sits on a model's output: measure in the step of an 8-bit grid over its range.
    return max(float(np.abs(reference).max()) / (2 ** (bits - 1) - 1), _MIN_STEP)


def _compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], tolerance_steps: float) -> list[OutputParity]:
    rows = []
    for ref, out in zip(expected, got):
        diff = float(np.abs(ref.astype(np.float64) - out.astype(np.float64)).max()) if ref.size else 0.0
        step = _step(ref)
        rows.append(OutputParity(diff, step, diff / step, diff <= tolerance_steps * step))
    return rows


def verify_onnx(qm: nn.Module, path: Union[str, Path], inputs: Sequence[Any], *, target: str = "cpu",
                tolerance_steps: float = 1.0, kwargs: Optional[dict[str, Any]] = None,
                follow_ties: bool = True) -> ParityReport:
    """Run ``path`` in ONNX Runtime and compare with ``qm`` in eval mode on the same inputs.

    The difference of each output is reported in units of the step of an 8-bit symmetric grid
    over that output's range (the model's own output is not quantized). Activation codes are
    compared quantizer by quantizer: where torch and ORT round an input that agrees to float
    precision to neighbouring codes (a tie), the model follows ORT's code, so one tie deep in a
    network is not mistaken for an export error; codes that differ for any other reason fail the
    check. ``follow_ties=False`` compares the outputs only, as computed. The deviation of ORT's
    fused integer kernels is reported beside it.
    """
    kwargs = dict(kwargs or {})
    with mode(qm, False), torch.no_grad():
        expected = [t.cpu().numpy() for t in tree_leaves(qm(*inputs, **kwargs)) if isinstance(t, torch.Tensor)]
    tensors = [a for a in list(inputs) + list(kwargs.values()) if isinstance(a, torch.Tensor)]

    def feeds_of(session) -> dict[str, np.ndarray]:
        return {meta.name: t.detach().cpu().numpy() for meta, t in zip(session.get_inputs(), tensors)}

    model = onnx.load(str(path))
    if model.ByteSize() < _PROTOBUF_LIMIT:
        probed, probes = probe_model(model, set(activation_scale_names(qm).values()))
        exact = onnx_session(probed.SerializeToString(), target, exact=True)
    else:  # too large to hold in one protobuf: outputs only, no tie following
        probes, exact = [], onnx_session(path, target, exact=True)
    got, resolved, count = tie_resolved_outputs(qm, exact, len(model.graph.output), probes, feeds_of(exact),
                                                inputs, kwargs)
    raw = _compare(expected, got, tolerance_steps)
    rows = _compare(resolved, got, tolerance_steps) if follow_ties else raw
    fused = onnx_session(path, target)
    return ParityReport(rows, exact.get_providers()[0], tolerance_steps,
                        raw_steps=max((o.steps for o in raw), default=0.0),
                        codes=count.codes, ties=count.ties if follow_ties else 0,
                        unexplained=count.unexplained if follow_ties else 0,
                        fused_steps=max((o.steps for o in _compare(expected, fused.run(None, feeds_of(fused)),
                                                                     tolerance_steps)), default=0.0))
