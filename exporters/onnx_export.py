"""``export_onnx``: lower, translate with torch.onnx (q/dq through the emitter registry), store
sub-8-bit weights as true INT4/UINT4 initializers, check, save."""
from __future__ import annotations

import collections
import contextlib
import inspect
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper
from torch.fx import GraphModule
from torch.utils._pytree import tree_map

from qzo_fx.capture.call_errors import check_inputs_fit
from qzo_fx.capture.export_inputs import auto_dims
from qzo_fx.errors import ExportError
from qzo_fx.example_inputs import positional_inputs
from qzo_fx.exporters.contiguous_attention import contiguous_attention
from qzo_fx.exporters.export_context import PACKABLE_KEY
from qzo_fx.exporters.export_errors import OnnxStageError, export_failure
from qzo_fx.exporters.library_ops import translation_table
from qzo_fx.exporters.lint import lint_target, resolve_target
from qzo_fx.exporters.lower import lower_for_export, lowered_meta
from qzo_fx.exporters.number_outputs import drop_number_outputs

__all__ = ["export_onnx", "ExportResult", "pack_low_bit_weights", "op_histogram", "strip_debug_info", "WEIGHT_FORMATS",
           "dynamic_shape_spec", "name_dynamic_axes", "uses_ort_kernels"]

_INT8_OPSET = 18
_INT4_OPSET = 21  # INT4/UINT4 and blocked (block_size) Q/DQ


@dataclass
class ExportResult:
    path: Path
    opset: int
    size_bytes: int
    op_types: dict[str, int]
    dynamic_batch: bool
    findings: list[str] = field(default_factory=list)
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)  # input name -> its dynamic axes

    def __str__(self) -> str:
        ops = ", ".join(f"{k}:{v}" for k, v in sorted(self.op_types.items()))
        return f"{self.path} ({self.size_bytes / 1024:.1f} KiB, opset {self.opset}) ops [{ops}]"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def _needs_int4_opset(lowered: nn.Module) -> bool:
    graphs = [m for m in lowered.modules() if isinstance(m, GraphModule)]  # every prepared part
    blocked = any(n.target is torch.ops.qzo.dequantize.default and n.args[4] > 0 for g in graphs for n in g.graph.nodes)
    return blocked or any(bits <= 4 for bits, _ in lowered_meta(lowered).get(PACKABLE_KEY, {}).values())


def pack_low_bit_weights(model: onnx.ModelProto, packable: dict[str, tuple[int, bool]]) -> int:
    """Store the codes (and zero points) of <= 4-bit weights as INT4/UINT4; returns how many."""
    import ml_dtypes

    by_name = {init.name: init for init in model.graph.initializer}
    packed, changed = 0, set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        prefix = next((p for p in packable if node.input[0].startswith(p) and node.input[0].endswith("codes")), None)
        if prefix is None or packable[prefix][0] > 4 or node.input[0] not in by_name or node.input[2] not in by_name:
            continue
        dtype = ml_dtypes.int4 if packable[prefix][1] else ml_dtypes.uint4
        for name in (node.input[0], node.input[2]):
            array = numpy_helper.to_array(by_name[name]).astype(np.int32).astype(dtype)
            by_name[name].CopyFrom(numpy_helper.from_array(array, name))
            changed.add(name)
        packed += 1
    # Recorded types of the repacked values are stale: drop them (shape inference re-derives).
    kept = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for value in model.graph.input:
        if value.name in changed:
            value.type.tensor_type.elem_type = by_name[value.name].data_type
    return packed


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop per-node stack traces, module paths and doc strings (most of a small model's file)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.graph.metadata_props[:]
    model.graph.doc_string = ""


def dynamic_shape_spec(module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], sequence: bool = True,
                       fixed: Optional[dict[str, dict[int, int]]] = None) -> dict:
    """torch.export ``dynamic_shapes`` by forward-argument name: the dimensions capture makes
    dynamic too (:func:`qzo_fx.capture.export_inputs.auto_dims`), or with ``sequence=False`` the
    batch only. ``Dim.AUTO`` lets torch.export keep an axis static where the model fixes it, and
    find which dynamic axes are equal. A list or dict argument gets a spec of its structure.

    ``fixed``: the dimensions asked to vary that the prepared graph was captured with fixed (its
    ``checked_dims``, input -> axis -> size), which stay static. A graph torch.export specialized
    to a size can still trace at others (a decoder loop unrolled over the example's 5 steps
    indexes any longer target), and the file would then return the example's steps at every
    length."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    spec = {name: tree_map(lambda leaf: auto_dims(leaf, sequence), value) for name, value in bound.arguments.items()}
    for name, axes in (fixed or {}).items():
        if isinstance(spec.get(name), dict):
            spec[name] = {axis: d for axis, d in spec[name].items() if axis not in axes}
    return spec


def _shape_candidates(module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                      fixed: Optional[dict[str, dict[int, int]]] = None) -> list:
    """The dynamic_shapes specs to try in order: a user's spec as given; for "auto", batch and
    sequence, then batch only, then static (a model that cannot have them)."""
    if dynamic_shapes is False or dynamic_shapes is None:
        return [None]
    if not isinstance(dynamic_shapes, str):
        return [dynamic_shapes]
    if dynamic_shapes != "auto":
        raise ExportError(f"dynamic_shapes={dynamic_shapes!r} is invalid: allowed 'auto', False, or a "
                          "torch.export dynamic_shapes spec.")
    return [dynamic_shape_spec(module, args, kwargs, fixed=fixed),
            dynamic_shape_spec(module, args, kwargs, sequence=False, fixed=fixed), None]


def check_and_save(model: onnx.ModelProto, path: Union[str, Path], what: str) -> Path:
    """Save ``model`` at ``path`` (folders created) once onnx.checker's full check passes."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise ExportError(f"{what} fails onnx.checker: {error}") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@contextlib.contextmanager
def quiet_onnx_export():
    """torch.onnx's progress lines, warnings and log records off for the export inside; the
    logger's level is restored whatever happens."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _translate(lowered: nn.Module, args: tuple, opset: int, shapes: Any, kwargs: Optional[dict] = None):
    """torch.export, then torch.onnx on the exported program (kept, so that a failure in the ONNX
    stage can be traced back to the model's module)."""
    with quiet_onnx_export():
        exported = torch.export.export(lowered, args, kwargs=kwargs or None, dynamic_shapes=shapes, strict=False)
        if contiguous_attention(exported.graph_module).modified:
            exported.graph_module.recompile()
        try:
            program = torch.onnx.export(exported, dynamo=True, custom_translation_table=translation_table(),
                                        opset_version=opset, optimize=True, verbose=False)
        except Exception as error:
            raise OnnxStageError(exported) from error
    if program is None:  # torch.onnx.export(dynamo=True) returns a program; None would be a torch change
        raise ExportError("torch.onnx.export returned no program for the model; this torch version is unsupported.")
    return drop_number_outputs(exported, program.model_proto)


_GENERATED_SYMBOL = re.compile(r"[su]\d+|unk__\d+")  # torch.export's symbols (s0, s17, ...)


def name_dynamic_axes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Name torch.export's symbol of the first axis of the inputs "batch" and of the second axis
    of integer inputs "sequence" (everywhere the symbol appears; names given at export are
    kept); returns the dynamic axes of each input."""
    _declare_constant_dims(model)
    names: dict[str, str] = {}
    found: dict[str, list[int]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        found[value.name] = [i for i, d in enumerate(dims) if d.dim_param]
        integer = value.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        for i, label in ((0, "batch"), (1, "sequence")):
            if len(dims) > i and _GENERATED_SYMBOL.fullmatch(dims[i].dim_param) and (i == 0 or integer):
                names.setdefault(dims[i].dim_param, label)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    return found


def _warn_fixed_batch_or_sequence(name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                                  axes: dict[str, list[int]]) -> None:
    """Warn where the file fixes a batch axis, or the sequence axis of an integer input, that
    export asked to keep dynamic: ``Dim.AUTO`` lets torch.export specialize it without an error
    (an ``nn.LSTM`` is unrolled over the example's steps), and a runtime then refuses other
    sizes that the prepared model takes."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    # auto_dims' batch axis, and the sequence axis of token inputs (a float's other axes may be
    # fixed by the weights that read them).
    fixed = [f"'{arg}' axis {axis} (size {value.shape[axis]})" for arg, value in bound.items()
             if isinstance(value, torch.Tensor) and arg in axes
             for axis in auto_dims(value, sequence=not value.is_floating_point()) or ()
             if axis not in axes[arg]]
    if fixed:
        warnings.warn(f"the export of {name} fixes {', '.join(fixed)}: torch.export specialized them to the example "
                      "(the model's code fixes that size, e.g. an nn.LSTM unrolled over its steps). The file takes "
                      "only those sizes, while the prepared model takes others; export with example inputs of the "
                      "size you will run, or one file per size.", UserWarning, stacklevel=3)


def _declare_constant_dims(model: onnx.ModelProto) -> None:
    """Write a dimension named after a number as that number. torch.onnx names a dimension that
    torch.export was asked to keep dynamic but specialized (an ``nn.LSTM``'s sequence) by its
    value, e.g. ``"7"``: a symbol to runtimes, which then accept any length the graph's constant
    reshapes cannot take."""
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param.isdecimal():
                dim.dim_value = int(dim.dim_param)


_RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}


def check_no_random_ops(model: onnx.ModelProto, name: str) -> None:
    """An exported file has eval semantics: the same input gives the same output."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in _RANDOM_OPS})
    if found:
        raise ExportError(f"the export of {name} holds random ops {found}: its eval-mode graph still draws random "
                          "numbers (dropout, drop path or noise outside `if self.training:`). Make them depend on "
                          "self.training (or nn.Dropout), prepare again, then export.")


WEIGHT_FORMATS = ("auto", "qdq", "matmulnbits")
# Targets of ONNX Runtime, whose MatMulNBits runs blocked low-bit weights without dequantizing them.
_NBITS_TARGETS = ("cpu", "cuda")


def uses_ort_kernels(weight_format: str, target: str) -> bool:
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"weight_format={weight_format!r} is invalid: allowed {WEIGHT_FORMATS}.")
    if weight_format == "auto":
        return resolve_target(target) in _NBITS_TARGETS
    return weight_format == "matmulnbits"


def _export_model(qm: nn.Module, lowered: nn.Module, args: tuple, kwargs: dict, opset: int, dynamic_shapes: Any):
    fixed = getattr(getattr(qm, "meta", {}).get("qzo.capture"), "checked_dims", None)
    candidates = _shape_candidates(lowered, args, kwargs, dynamic_shapes, fixed)
    for i, shapes in enumerate(candidates):
        try:
            model = _translate(lowered, args, opset, shapes, kwargs)
        except Exception as error:
            if i == len(candidates) - 1:
                raise export_failure(qm, lowered, error) from error
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            continue
        if shapes is None and len(candidates) > 1:
            warnings.warn(f"{type(qm).__name__} was exported with the example's shapes only: no dimension could be "
                          f"made dynamic ({reason[:300]}). The file takes only those shapes; pass dynamic_shapes=... "
                          "to say which dimensions vary.", UserWarning, stacklevel=3)
        return model
    raise AssertionError("unreachable")


def export_onnx(qm: GraphModule, example_inputs: Sequence[Any], path: Union[str, Path], *, target: str = "auto",
                weight_format: str = "auto", opset: Optional[int] = None, fold_batchnorm: bool = True,
                dynamic_shapes: Any = "auto", strict: bool = False, keep_debug_info: bool = False,
                example_kwargs: Optional[dict[str, Any]] = None) -> ExportResult:
    """Export a prepared model to ONNX with integer weights and Q/DQ activations.

    Weights become integer initializers (int8/uint8; <= 4 bits as true INT4/UINT4 at opset 21)
    feeding DequantizeLinear (per channel, or blocked per group), or ONNX Runtime's MatMulNBits
    for blocked weights of linears and matmuls; activations become QuantizeLinear -> (Clip) ->
    DequantizeLinear; BatchNorm is folded into the dequantization scales. The file passes
    ``onnx.checker.check_model(full_check=True)``.

    Args:
        qm: a prepared model (it is not changed: lowering works on a copy).
        example_inputs: positional inputs for tracing, a tuple or one tensor (batch >= 2 keeps the batch
            dynamic).
        path: where to write the ``.onnx`` file.
        target: "auto" (the ONNX Runtime providers here), "cpu", "cuda", "tensorrt" or
            "portable" (any runtime): the lint refuses what would compute wrong results there
            and warns about what will not accelerate; ``strict=True`` raises on warnings too.
        weight_format: "qdq" (standard DequantizeLinear, any runtime), "matmulnbits" (blocked
            2/4/8-bit weights of linears and matmuls as ORT's com.microsoft MatMulNBits, which
            computes from the packed weights) or "auto": MatMulNBits for ORT targets ("cpu",
            "cuda"), Q/DQ for "tensorrt" and "portable".
        opset: default: 21 when any weight is <= 4 bits or blocked, else 18.
        fold_batchnorm: fold eval-mode BatchNorm into the preceding conv/linear.
        dynamic_shapes: "auto" (the batch of every input, the sequence of integer inputs and
            every axis of 2-D and 3-D float inputs are dynamic where the model allows; static
            otherwise, with a warning), False (the example's shapes), or a torch.export
            ``dynamic_shapes`` spec.
        keep_debug_info: keep torch.onnx's per-node stack traces and module paths.
        example_kwargs: keyword inputs (tensors become ONNX inputs after the positional ones;
            other values are fixed at export).

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(8, 4), qzo_fx.QuantConfig(weight_bits=4))
        >>> qzo_fx.export_onnx(qm, (torch.randn(2, 8),), "/tmp/l.onnx").opset
        21
    """
    example_inputs = positional_inputs(example_inputs, "export_onnx") or ()
    check_inputs_fit(qm, example_inputs, dict(example_kwargs or {}), "export_onnx")
    wide = next((n for n, t in qm.named_parameters() if t.dtype == torch.float64), None)
    if wide is not None:
        raise ExportError(f"'{wide}' is float64: the file stores float32 scales and weights, so export a float32 "
                          "model (qm.float()); the float64 copy stays yours.")
    findings = lint_target(qm, target, strict=strict)
    for finding in findings:
        warnings.warn(finding, UserWarning, stacklevel=2)
    lowered = lower_for_export(qm, fold_bn=fold_batchnorm, ort_contrib_ops=uses_ort_kernels(weight_format, target))
    needs_int4 = _needs_int4_opset(lowered)
    chosen = opset or (_INT4_OPSET if needs_int4 else _INT8_OPSET)
    if chosen < _INT4_OPSET and needs_int4:
        raise ExportError(f"opset={opset}: int4 or blocked weights need opset >= {_INT4_OPSET}; leave opset unset.")
    model = _export_model(qm, lowered, example_inputs, dict(example_kwargs or {}), chosen, dynamic_shapes)
    check_no_random_ops(model, type(qm).__name__)
    pack_low_bit_weights(model, lowered_meta(lowered).get(PACKABLE_KEY, {}))
    if not keep_debug_info:
        strip_debug_info(model)
    axes = name_dynamic_axes(model)
    if dynamic_shapes == "auto":
        _warn_fixed_batch_or_sequence(type(qm).__name__, lowered, example_inputs, dict(example_kwargs or {}), axes)
    path = check_and_save(model, path, "the exported model")
    dynamic_batch = bool(axes) and all(0 in dims for dims in axes.values() if dims is not None)
    return ExportResult(path, chosen, path.stat().st_size, op_histogram(model), dynamic_batch, findings, axes)
