"""Run an exported file the way a user does, and in the ONNX spec's reference evaluator.

* ONNX Runtime: ``onnxruntime.InferenceSession(path)`` with default options (all graph
  optimizations, the default CPU provider).
* ``onnx.reference.ReferenceEvaluator``: the operators as the ONNX spec defines them. It
  implements DequantizeLinear from opset 19 on; for files of lower opsets its opset-19 kernel is
  registered under the op's name: for int8/uint8 inputs opsets 13 and 19 define the same
  function (19 only adds float8 types). GatherElements and MaxPool are registered too, written
  from the spec, where onnx 1.23's kernels are wrong (see the classes' docstrings).

Outputs are compared in *output steps*: one step of an 8-bit symmetric grid over the torch
output's range (see :func:`tests.zoo.outputs.output_step`).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_19
from onnx.reference.ops.op_quantize_linear import QuantizeLinear_19

from tests.zoo.cases import Case
from tests.zoo.outputs import steps_apart, tensors
from tests.zoo.results import CheckFailed, first_line

# Above this many nodes or this file size the pure-numpy evaluator takes minutes here.
REFERENCE_MAX_NODES = 4000
REFERENCE_MAX_BYTES = 64 * 2**20


@dataclass
class FileInfo:
    opset: int
    inputs: list[tuple[str, list]]  # name, dims (int or symbolic name / "?")
    outputs: int
    nodes: int
    bytes: int

    @property
    def dynamic_batch(self) -> bool:
        """Every input's first axis is symbolic (a ``dim_param``) or unset."""
        return all(dims and not isinstance(dims[0], int) for _, dims in self.inputs)


def file_info(path: str) -> FileInfo:
    model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    init = {i.name for i in model.graph.initializer}
    inputs = [(i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                        for d in i.type.tensor_type.shape.dim]) for i in model.graph.input if i.name not in init]
    return FileInfo(opset, inputs, len(model.graph.output), len(model.graph.node), model.ByteSize())


def named_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """The tensor inputs of one call, named after the user's ``forward`` parameters."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"arg{i}" for i in range(len(args))]
    pairs = list(zip(names, args)) + list(kwargs.items())
    return [(n, t) for n, t in pairs if isinstance(t, torch.Tensor)]


def feeds(file_inputs: list[str], given: list[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Match the file's inputs to the call's tensors: by name when every name is known, else by
    position when the counts agree."""
    by_name = dict(given)
    if all(name in by_name for name in file_inputs):
        return {name: by_name[name].numpy() for name in file_inputs}
    if len(file_inputs) == len(given):
        return {name: t.numpy() for name, (_, t) in zip(file_inputs, given)}
    raise ValueError(f"the file's inputs {file_inputs} do not match the call's tensors {[n for n, _ in given]}")


class _DequantizeLinear13(DequantizeLinear_19):
    """DequantizeLinear of opsets 10-18 (int8/uint8/int32 only): the opset-19 kernel."""

    op_domain = ""

    def _run(self, x, x_scale, x_zero_point=None, axis=1, block_size=0, output_dtype=None):
        return DequantizeLinear_19._run(self, x, x_scale, x_zero_point, axis=axis)


class _QuantizeLinear13(QuantizeLinear_19):
    """QuantizeLinear of opsets 10-18 (int8/uint8 only): the opset-19 kernel, saturating."""

    op_domain = ""

    def _run(self, x, y_scale, zero_point=None, axis=1, saturate=True, block_size=0, output_dtype=None,
             precision=None):
        return QuantizeLinear_19._run(self, x, y_scale, zero_point, axis=axis, saturate=True)


class _GatherElements(OpRun):
    """GatherElements as the spec defines it (output shape = indices shape, negative indices
    count from the end). onnx 1.23's kernel goes through ``np.choose``, which takes at most 64
    choices along the axis and fails on some 2-D layouts (a [1, 64] position-id buffer)."""

    op_domain = ""

    def _run(self, data, indices, axis=0):
        axis = axis % data.ndim
        grid = list(np.indices(indices.shape, sparse=True))
        grid[axis] = np.where(indices < 0, indices + data.shape[axis], indices)
        return (data[tuple(grid)],)


class _MaxPool(OpRun):
    """MaxPool (output Y, explicit pads) as the spec defines it. onnx 1.23's kernel gives too large
    an output with pads and ceil_mode (8x8 input, kernel 3, stride 1, pad 1: 10x10 instead of 8x8).
    With ceil_mode, a window that would start in the right padding is dropped (opset 19 text)."""

    op_domain = ""

    def _run(self, x, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, pads=None,
             storage_order=0, strides=None):
        if auto_pad not in ("NOTSET", b"NOTSET") or storage_order:
            raise NotImplementedError(f"MaxPool auto_pad={auto_pad!r} storage_order={storage_order}")
        dims = len(kernel_shape)
        dilations, strides = dilations or [1] * dims, strides or [1] * dims
        pads = pads or [0] * (2 * dims)
        padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)],
                        constant_values=-np.inf)
        out_shape = []
        for i in range(dims):
            span = x.shape[2 + i] + pads[i] + pads[i + dims] - dilations[i] * (kernel_shape[i] - 1) - 1
            n = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
            if ceil_mode and (n - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
                n -= 1  # the last window would start in the right padding
            out_shape.append(n)
        y = np.full(x.shape[:2] + tuple(out_shape), -np.inf, dtype=x.dtype)
        for offset in np.ndindex(*kernel_shape):
            index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                          for o, d, n, s in zip(offset, dilations, out_shape, strides))
            window = padded[(slice(None), slice(None)) + index]
            pad_to = [(0, 0), (0, 0)] + [(0, n - w) for n, w in zip(out_shape, window.shape[2:])]
            y = np.maximum(y, np.pad(window, pad_to, constant_values=-np.inf))
        return (y,)


_DequantizeLinear13.__name__, _QuantizeLinear13.__name__ = "DequantizeLinear", "QuantizeLinear"
_GatherElements.__name__, _MaxPool.__name__ = "GatherElements", "MaxPool"


def reference_evaluator(path: str, info: FileInfo):
    new_ops = [_GatherElements, _MaxPool] + ([_DequantizeLinear13, _QuantizeLinear13] if info.opset < 19 else [])
    return ReferenceEvaluator(onnx.load(path), new_ops=new_ops)


def reference_skip_reason(info: FileInfo) -> str:
    if info.nodes > REFERENCE_MAX_NODES:
        return f"{info.nodes} nodes > {REFERENCE_MAX_NODES} (too slow in numpy here)"
    if info.bytes > REFERENCE_MAX_BYTES:
        return f"{info.bytes / 2**20:.0f} MiB > {REFERENCE_MAX_BYTES // 2**20} MiB"
    return ""


@dataclass
class InputSet:
    """One call: its feeds, torch's eval-mode tensors and ONNX Runtime's outputs."""

    label: str
    feed: dict[str, np.ndarray]
    paths: list[str]
    torch_out: list[np.ndarray]
    ort_out: list[np.ndarray] = field(default_factory=list)


def input_sets(case: Case, args, kwargs, info: FileInfo, given_names: list[str]) -> list[tuple[str, tuple, dict]]:
    """The example inputs, another batch when the file's batch is dynamic, and another sequence
    length when the file's sequence axis is dynamic."""
    sets = [(f"batch {case.batch}", args, kwargs)]
    if info.dynamic_batch:
        sets.append((f"batch {case.batch + 1}", *case.inputs(case.batch + 1, seed=3)))
    if case.has_sequence and _sequence_dynamic(case, info, given_names):
        sets.append((f"sequence {case.seq + 3}", *case.inputs(seq=case.seq + 3, seed=3)))
    return sets


def _sequence_dynamic(case: Case, info: FileInfo, given_names: list[str]) -> bool:
    specs = dict(zip(given_names, list(case.args) + list(case.kwargs.values())))
    dims = dict(info.inputs)
    axes = [(name, spec.shape.index("S")) for name, spec in specs.items() if "S" in spec.shape and name in dims]
    return bool(axes) and all(not isinstance(dims[name][axis], int) for name, axis in axes)


def onnxruntime_stage(stage, qm: torch.nn.Module, model: torch.nn.Module, case: Case, path: str, args, kwargs,
                      info: dict, sets: list[InputSet]) -> None:
    """ORT's default session against ``qm.eval()``: every floating output within one output step,
    at every input set. Fills ``sets`` (for the reference stage) as it goes."""
    meta = file_info(path)
    try:
        session = new_session(path)
    except Exception as error:  # the file does not load in the user's default session
        raise CheckFailed(f"onnxruntime.InferenceSession(path) failed: {first_line(error)}") from error
    file_inputs = [i.name for i in session.get_inputs()]
    names = [n for n, _ in named_inputs(model, args, kwargs)]
    info["onnx"] = info.get("onnx", {}) | dict(opset=meta.opset, nodes=meta.nodes, inputs=meta.inputs,
                                              providers=session.get_providers())
    problems, worst, worst_inputs = [], 0.0, (args, kwargs)
    qm.eval()
    for label, a, k in input_sets(case, args, kwargs, meta, names):
        with torch.no_grad():
            expected = tensors(qm(*a, **k))
        item = InputSet(label, feeds(file_inputs, named_inputs(model, a, k)), [p for p, _ in expected],
                        [t.numpy() for _, t in expected])
        try:
            item.ort_out = session.run(None, item.feed)
        except Exception as error:  # the file does not run these inputs: a broken file for the user
            raise CheckFailed(f"{label}: session.run failed: {first_line(error)}") from error
        sets.append(item)
        if len(item.ort_out) != len(item.torch_out):
            problems.append(f"{label}: the file has {len(item.ort_out)} outputs, the model returns "
                            f"{len(item.torch_out)} tensors ({', '.join(item.paths)[:120]})")
            continue
        deviation = _worst(item.torch_out, item.ort_out, item.paths, problems, label, "ORT")
        if deviation > worst:
            worst, worst_inputs = deviation, (a, k)
    info["ort_steps"] = worst
    info["ort_sets"] = [s.label for s in sets]
    info["jitter_steps"] = float_jitter(qm, args, kwargs)
    _record_verify(qm, path, *worst_inputs, info)  # at the inputs ORT deviates most on
    stage.note = f"max {worst:.2f} output steps over {', '.join(info['ort_sets'])}"
    if problems:
        raise CheckFailed("; ".join(problems[:3]))


def float_jitter(qm: torch.nn.Module, args, kwargs) -> Any:
    """How far ``qm.eval()``'s own outputs move, in output steps, when every float input is scaled
    by (1 + 2^-20): float-noise-sized changes, like those between two runtimes' kernels. Above one
    step, a rounding tie deep in the network moves the output by more than the tolerance. None for
    models without float inputs."""
    if not any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in list(args) + list(kwargs.values())):
        return None
    nudge = 1 + 2.0 ** -20

    def scaled(t):
        return t * nudge if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    with torch.no_grad():
        base = [t.numpy() for _, t in tensors(qm(*args, **kwargs))]
        moved = [t.numpy() for _, t in tensors(qm(*map(scaled, args), **{k: scaled(v) for k, v in kwargs.items()}))]
    return max((steps_apart(b, m) for b, m in zip(base, moved) if np.issubdtype(b.dtype, np.floating)), default=0.0)


def reference_stage(stage, path: str, sets: list[InputSet], info: dict) -> None:
    """The reference evaluator against ``qm.eval()`` (is the file right?) and against ORT (does
    the runtime deviate from the file?)."""
    meta = file_info(path)
    reason = reference_skip_reason(meta)
    if reason:
        stage.status, stage.note = "skip", reason
        return
    problems, ref_torch, ort_ref, evaluator = [], 0.0, 0.0, None
    for item in sets:
        start = time.perf_counter()
        try:
            evaluator = evaluator or reference_evaluator(path, meta)
            ref_out = evaluator.run(None, item.feed)
        except Exception as error:  # the evaluator lacks or mis-implements a kernel: not the file's fault
            stage.status = "skip"
            stage.note = f"the reference evaluator failed on {item.label}: {type(error).__name__}: {str(error)[:160]}"
            return
        if len(ref_out) != len(item.torch_out):
            problems.append(f"{item.label}: {len(ref_out)} outputs vs {len(item.torch_out)} tensors")
            continue
        ref_torch = max(ref_torch, _worst(item.torch_out, ref_out, item.paths, problems, item.label, "reference"))
        if len(item.ort_out) == len(ref_out):
            ort_ref = max(ort_ref, max((steps_apart(r, np.asarray(o)) for r, o in zip(ref_out, item.ort_out)),
                                       default=0.0))
        if time.perf_counter() - start > 30:
            break  # one slow set is enough to tell a wrong file
    info["ref_steps"], info["ort_ref_steps"] = ref_torch, ort_ref
    stage.note = f"reference vs torch {ref_torch:.2f} steps, ORT vs reference {ort_ref:.2f} steps"
    if problems:
        raise CheckFailed("; ".join(problems[:3]))


def _record_verify(qm, path: str, args, kwargs, info: dict) -> None:
    """What ``qzo_fx.verify_onnx`` says: recorded beside the zoo's own verdict, never used for it."""
    import qzo_fx

    try:
        report = qzo_fx.verify_onnx(qm, path, args, kwargs=kwargs or None)
        info["verify"] = dict(ok=bool(report.ok), says=" ".join(str(report).split())[:300])
    except Exception as error:
        info["verify"] = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}")


def _worst(expected: list[np.ndarray], got: list[np.ndarray], paths: list[str], problems: list[str],
           label: str, who: str) -> float:
    worst = 0.0
    for path, e, g in zip(paths, expected, got):
        d = steps_apart(e, np.asarray(g))
        worst = max(worst, d)
        if not d <= 1.0:
            what = f"shape {list(np.shape(g))} vs {list(e.shape)}" if np.shape(g) != e.shape else f"{d:.3g} steps"
            problems.append(f"{label}: {who} {path} {what}")
    return worst


def new_session(path: str) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(path)  # the user's default: no options, no providers
