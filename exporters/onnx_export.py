"""``export_onnx``: lower, translate with torch.onnx (q/dq through the emitter registry), store
sub-8-bit weights as true INT4/UINT4 initializers, check, save."""
from __future__ import annotations

import collections
import contextlib
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

from qzo_fx.errors import ExportError
from qzo_fx.exporters.emitters import EMITTERS
from qzo_fx.exporters.export_context import PACKABLE_KEY
from qzo_fx.exporters.lint import lint_target
from qzo_fx.exporters.lower import lower_for_export, lowered_meta

__all__ = ["export_onnx", "ExportResult", "pack_low_bit_weights", "op_histogram", "strip_debug_info"]

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

    def __str__(self) -> str:
        ops = ", ".join(f"{k}:{v}" for k, v in sorted(self.op_types.items()))
        return f"{self.path} ({self.size_bytes / 1024:.1f} KiB, opset {self.opset}) ops [{ops}]"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def _needs_int4_opset(lowered: GraphModule) -> bool:
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


def _dynamic_shapes(args: Sequence[Any]):
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def _translate(lowered: GraphModule, args: tuple, opset: int, dynamic: bool, kwargs: Optional[dict] = None):
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(lowered, args, kwargs=kwargs or None, dynamo=True,
                                        custom_translation_table=EMITTERS, opset_version=opset, optimize=True,
                                        verbose=False, dynamic_shapes=_dynamic_shapes(args) if dynamic else None)
    finally:
        quiet.setLevel(level)
    return program.model_proto


_CALL_SITE = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')


def _export_failure(qm: nn.Module, error: Exception) -> ExportError:
    """An ExportError that leads with the cause, the model line and the way out; torch's text follows."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    chain, cause = [], error
    while cause is not None:
        chain.append(type(cause).__name__)
        cause = cause.__cause__
    site = _CALL_SITE.search(text)
    where = f" at {site[1]}:{site[2]} in {site[3]}: `{site[4].strip()}`" if site else ""
    if "GuardOnDataDependentSymNode" in chain or "data-dependent" in text:
        hint = ("the model branches in Python on a tensor's value, and an ONNX graph has no Python branches. "
                "Rewrite the branch with torch.cond (both sides traced) or torch.where (both computed), "
                "then export again; training with qzo_fx works as it is")
    else:
        hint = "qzo_fx.examine(model, example_inputs) lists the constructs that cannot be captured"
    return ExportError(f"torch.onnx could not export {type(qm).__name__}{where}: {hint}.\n\n{text}")


def export_onnx(qm: GraphModule, example_inputs: Sequence[Any], path: Union[str, Path], *, target: str = "auto",
                opset: Optional[int] = None, fold_batchnorm: bool = True, dynamic_batch: bool = True,
                strict: bool = False, keep_debug_info: bool = False,
                example_kwargs: Optional[dict[str, Any]] = None) -> ExportResult:
    """Export a prepared model to ONNX with integer weights and Q/DQ activations.

    Weights become integer initializers (int8/uint8; <= 4 bits as true INT4/UINT4 at opset 21)
    feeding DequantizeLinear (per channel, or blocked per group); activations become
    QuantizeLinear -> (Clip) -> DequantizeLinear; BatchNorm is folded into the dequantization
    scales. The file passes ``onnx.checker.check_model(full_check=True)``.

    Args:
        qm: a prepared model (it is not changed: lowering works on a copy).
        example_inputs: positional inputs for tracing (batch >= 2 keeps the batch dynamic).
        path: where to write the ``.onnx`` file.
        target: "auto", "cpu", "cuda" or "tensorrt": the lint warns about configs that will not
            run or not accelerate there; with ``strict=True`` such findings raise.
        opset: default: 21 when any weight is <= 4 bits or blocked, else 18.
        fold_batchnorm: fold eval-mode BatchNorm into the preceding conv/linear.
        dynamic_batch: export the first dimension of every input as dynamic.
        keep_debug_info: keep torch.onnx's per-node stack traces and module paths.
        example_kwargs: keyword inputs (tensors become ONNX inputs after the positional ones;
            other values are fixed at export).

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(8, 4), qzo_fx.QuantConfig(weight_bits=4))
        >>> qzo_fx.export_onnx(qm, (torch.randn(2, 8),), "/tmp/l.onnx").opset
        21
    """
    findings = lint_target(qm, target, strict=strict)
    for finding in findings:
        warnings.warn(finding, UserWarning, stacklevel=2)
    lowered = lower_for_export(qm, fold_bn=fold_batchnorm)
    needs_int4 = _needs_int4_opset(lowered)
    chosen = opset or (_INT4_OPSET if needs_int4 else _INT8_OPSET)
    if chosen < _INT4_OPSET and needs_int4:
        raise ExportError(f"opset={opset}: int4 or blocked weights need opset >= {_INT4_OPSET}; leave opset unset.")
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    # A dynamic batch first where asked for; a model that cannot have one is exported static.
    attempts = (True, False) if dynamic_batch and not kwargs else (False,)
    for dynamic in attempts:
        try:
            model = _translate(lowered, args, chosen, dynamic, kwargs)
            break
        except Exception as error:
            if dynamic == attempts[-1]:
                raise _export_failure(qm, error) from error
    pack_low_bit_weights(model, lowered_meta(lowered).get(PACKABLE_KEY, {}))
    if not keep_debug_info:
        strip_debug_info(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise ExportError(f"the exported model fails onnx.checker: {error}") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return ExportResult(path, chosen, path.stat().st_size, op_histogram(model), dynamic, findings)
