"""Parity between ONNX Runtime's default session and the eval-mode PyTorch model, in quantization steps."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from qzo_fx.capture.modes import mode
from qzo_fx.errors import ExportError
from qzo_fx.example_inputs import positional_inputs
from qzo_fx.exporters.openvino_runtime import OpenVinoSession
from qzo_fx.exporters.runtime import available_targets, onnx_session
from qzo_fx.exporters.ties import TieCount, probe_model, tie_resolved_outputs

__all__ = ["verify_onnx", "ParityReport", "OutputParity", "ProviderParity", "DEFAULT_TOLERANCE_STEPS"]

# After rounding ties are followed (see qzo_fx.exporters.ties) every activation code equals ORT's,
# so what is left is float rounding of the unquantized ops (LayerNorm, Softmax, residual adds, the
# head): far below one step of an 8-bit grid over the output's range. A real export error moves
# codes that sit nowhere near a boundary, which fails as "unexplained" whatever this tolerance.
DEFAULT_TOLERANCE_STEPS = 1.0


@dataclass
class OutputParity:
    max_abs_diff: float
    step: float          # the output quantization step the difference is measured in
    steps: float         # max_abs_diff / step
    ok: bool


@dataclass
class ProviderParity:
    """One provider's default session against the model: as it is (``raw_steps``, ``raw_ok``)
    and with the model following ORT's rounding ties (``outputs``, ``counts``)."""

    provider: str
    outputs: list[OutputParity]
    raw_steps: float
    counts: TieCount
    raw_ok: bool = True

    @property
    def ok(self) -> bool:
        """The session's outputs within tolerance as they are, and every activation code ORT's
        or a tie: a session off by more than the tolerance fails, whatever explains it."""
        return self.raw_ok and all(o.ok for o in self.outputs) and not self.counts.unexplained

    @property
    def ties_only(self) -> bool:
        """Off as it is, but exact once the model follows ORT at its rounding ties."""
        return not self.raw_ok and all(o.ok for o in self.outputs) and not self.counts.unexplained


@dataclass
class ParityReport:
    """The file in ``onnxruntime.InferenceSession(path)`` (default options: integer kernels fused)
    against the eval-mode model, on every provider checked. ``ok`` needs each provider's outputs
    within ``tolerance_steps`` of the model, and no activation code that differs from ORT's other
    than at a rounding tie (``unexplained``). Where a session is off only because of ties, the
    report says so: the file computes the model's function, and the model's output moves by more
    than the tolerance when one code at a tie changes. ``raw_steps``: the largest difference."""

    runs: list[ProviderParity]
    tolerance_steps: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(run.ok for run in self.runs)

    @property
    def outputs(self) -> list[OutputParity]:
        return self.runs[0].outputs

    @property
    def provider(self) -> str:
        return self.runs[0].provider

    @property
    def raw_steps(self) -> float:
        return max(run.raw_steps for run in self.runs)

    @property
    def ties_only(self) -> bool:
        """Failed, and only because the model's output moves that much at rounding ties."""
        return not self.ok and all(run.ok or run.ties_only for run in self.runs)

    @property
    def codes(self) -> int:
        return sum(run.counts.codes for run in self.runs)

    @property
    def ties(self) -> int:
        return sum(run.counts.ties for run in self.runs)

    @property
    def unexplained(self) -> int:
        return sum(run.counts.unexplained for run in self.runs)

    def __str__(self) -> str:
        lines = [f"parity {'OK' if self.ok else 'FAILED'} (default session; tolerance {self.tolerance_steps} step)"]
        for run in self.runs:
            parts = ", ".join(f"max |diff| {o.max_abs_diff:.3g} = {o.steps:.3f} steps" for o in run.outputs)
            lines.append(f"  {run.provider}: {parts}; {run.counts.codes} activation codes: {run.counts.ties} ties "
                         f"followed, {run.counts.unexplained} unexplained; without following ties: "
                         f"{run.raw_steps:.3f} steps")
            if run.ties_only:
                lines.append(f"  {run.provider} is {run.raw_steps:.3f} steps off only through {run.counts.ties} "
                             "rounding tie(s): where torch's value lies within float precision of a rounding "
                             "boundary ORT picked the neighbouring code, and with ORT's picks the model matches. "
                             "The file computes the model's function; this model's output moves by more than "
                             "the tolerance when one activation code changes (common at random init).")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


_PROTOBUF_LIMIT = 2**31 - 2**24  # a serialized ModelProto must stay under 2 GiB
_MIN_STEP = 1e-6  # outputs that are all ~0 (zero-initialised heads) are compared in absolute terms


def _step(reference: np.ndarray, bits: int = 8) -> float:
    # No quantizer sits on a model's output: measure in the step of an 8-bit grid over its range.
    return max(float(np.abs(reference).max()) / (2 ** (bits - 1) - 1), _MIN_STEP) if reference.size else _MIN_STEP


def _compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], tolerance_steps: float) -> list[OutputParity]:
    if len(expected) != len(got):
        raise ExportError(f"the file has {len(got)} outputs and the model {len(expected)}: not the same program.")
    rows = []
    for ref, out in zip(expected, got):
        diff = float(np.abs(ref.astype(np.float64) - np.asarray(out).astype(np.float64)).max()) if ref.size else 0.0
        step = _step(ref)
        rows.append(OutputParity(diff, step, diff / step, diff <= tolerance_steps * step))
    return rows


def _open(model: Union[Path, bytes], target: str):
    if target == "openvino":
        return OpenVinoSession(model)
    return onnx_session(model, target)


def _check_provider(qm: nn.Module, path: Path, model: onnx.ModelProto, target: str, inputs, kwargs,
                    expected: list[np.ndarray], tolerance_steps: float, follow_ties: bool) -> ProviderParity:
    session = _open(path, target)
    # The file's inputs are the tensor leaves of the call, in the order torch.export flattens
    # them: bound to the forward's parameters (keywords in its order), and a list or dict
    # argument (multi-scale features, a batch dict) is several inputs.
    bound = inspect.signature(qm.forward).bind(*inputs, **kwargs).arguments
    tensors = [a for a in tree_leaves(list(bound.values())) if isinstance(a, torch.Tensor)]
    names = [meta.name for meta in session.get_inputs()]
    if len(names) != len(tensors):
        raise ExportError(f"verify_onnx: the file takes {len(names)} inputs ({', '.join(names)}) and these inputs "
                          f"hold {len(tensors)} tensors: pass inputs of the structure the file was exported with.")
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}
    got = session.run(None, feeds)
    raw = _compare(expected, got, tolerance_steps)
    counts, resolved = TieCount(), expected
    if follow_ties and model.ByteSize() < _PROTOBUF_LIMIT:
        probed, probes = probe_model(model)
        probe_session = _open(probed.SerializeToString(), target)
        resolved, counts = tie_resolved_outputs(qm, probe_session, probes, feeds, inputs, kwargs)
    rows = _compare(resolved, got, tolerance_steps)
    return ProviderParity(session.get_providers()[0], rows, max((o.steps for o in raw), default=0.0), counts,
                          raw_ok=all(o.ok for o in raw))


def verify_onnx(qm: nn.Module, path: Union[str, Path], inputs: Sequence[Any], *, target: str = "auto",
                tolerance_steps: float = DEFAULT_TOLERANCE_STEPS, kwargs: Optional[dict[str, Any]] = None,
                follow_ties: bool = True, runtime: str = "onnxruntime",
                example_kwargs: Optional[dict[str, Any]] = None) -> ParityReport:
    """Run ``path`` in ONNX Runtime's default session and compare with ``qm`` in eval mode.

    The session is ``onnxruntime.InferenceSession(path)`` with default options, the one users
    open: every graph optimization on, so W8A8 ops run as fused integer kernels. ``target="auto"``
    checks the CPU provider and, where this onnxruntime lists them, CUDA and TensorRT; "cpu",
    "cuda" or "tensorrt" checks that one. The difference of each output is measured in units of
    the step of an 8-bit symmetric grid over that output's range.

    The outputs must be within ``tolerance_steps`` as the session gives them. Activation codes
    are compared too, quantizer by quantizer: where torch's input lies within float precision of
    the rounding boundary and ORT picked the neighbouring code (a tie), the model follows ORT's
    code; any other differing code fails the check, and a session that is off only through ties
    fails with that diagnosis (the file is right; the model is that sensitive to one code).
    ``follow_ties=False`` compares the outputs only.

    ``kwargs`` (or ``example_kwargs``, as :func:`export_onnx` names them): keyword inputs.

    ``runtime="openvino"``: the same check in OpenVINO's CPU runtime, in f32 arithmetic (see
    :mod:`qzo_fx.exporters.openvino_runtime`), the second reader a portable file must satisfy.

    Example:
        >>> report = qzo_fx.verify_onnx(qm, "model.onnx", (x,))   # doctest: +SKIP
        >>> report.ok                                              # doctest: +SKIP
        True
    """
    if kwargs is not None and example_kwargs is not None:
        raise ExportError("verify_onnx got both kwargs= and example_kwargs=: they are one argument; pass one.")
    kwargs = dict(kwargs if kwargs is not None else example_kwargs or {})
    inputs = positional_inputs(inputs, "verify_onnx") or ()
    with mode(qm, False), torch.no_grad():
        expected = [t.cpu().numpy() for t in tree_leaves(qm(*inputs, **kwargs)) if isinstance(t, torch.Tensor)]
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"verify_onnx: no file at {path}; export it first (qzo_fx.export_onnx(qm, inputs, path)).")
    model = onnx.load(str(path))
    if runtime not in ("onnxruntime", "openvino"):
        raise ExportError(f"runtime={runtime!r} is invalid: allowed 'onnxruntime' or 'openvino'.")
    targets = ["openvino"] if runtime == "openvino" else available_targets() if target == "auto" else [target]
    runs = [_check_provider(qm, path, model, t, inputs, kwargs, expected, tolerance_steps, follow_ties)
            for t in targets]
    notes = [] if follow_ties and model.ByteSize() < _PROTOBUF_LIMIT or not follow_ties else [
        "the file is too large for one protobuf: outputs compared without following ties"]
    return ParityReport(runs, tolerance_steps, notes)
