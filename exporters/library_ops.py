"""ONNX translations of custom ops that other libraries register and torch.onnx does not know.

A model's own code may call a library's custom op: transformers' mixture-of-experts layers
(Mixtral, Qwen-MoE, ...) run their experts through ``transformers::grouped_mm_fallback`` on
CPU. Such an op exists only once its library is imported, so the translation table is built
at export time from the ops present then.
"""
from __future__ import annotations

from typing import Callable

import onnx
import torch
from onnxscript import opset18 as op

from qzo_fx.exporters.aten_translations import ATEN_EMITTERS
from qzo_fx.exporters.emitters import EMITTERS

__all__ = ["translation_table", "emit_grouped_mm"]


def emit_grouped_mm(rows, weights, ends):
    """``out[r] = rows[r] @ weights[g]`` for the rows ``[ends[g-1], ends[g])`` of group ``g``
    (rows sorted by group; rows past the last end are 0, as in the op's eager kernel).

    The number of groups (experts) is static: one Slice -> MatMul per group, then Concat, so no
    group's weight is gathered per row."""
    groups = weights.shape[0]
    if not isinstance(groups, int):
        raise ValueError("grouped_mm: the number of groups (weights.shape[0]) must be static")
    ends = op.Cast(ends, to=onnx.TensorProto.INT64)
    first_axis = op.Constant(value_ints=[0])
    start, parts = op.Constant(value_ints=[0]), []
    for group in range(groups):
        end = op.Slice(ends, op.Constant(value_ints=[group]), op.Constant(value_ints=[group + 1]))
        weight = op.Gather(weights, op.Constant(value_int=group), axis=0)
        parts.append(op.MatMul(op.Slice(rows, start, end, first_axis), weight))
        start = end
    out = op.Concat(*parts, axis=0)
    unrouted = op.Sub(op.Shape(rows, start=0, end=1), start)
    no_pad = op.Constant(value_ints=[0])
    return op.Pad(out, op.Concat(no_pad, no_pad, unrouted, no_pad, axis=0))


def _library_op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>.default`` if its library has registered it, else None."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


_LIBRARY_EMITTERS = ((("transformers", "grouped_mm_fallback"), emit_grouped_mm),)


def translation_table() -> dict[Callable, Callable]:
    """The qzo emitters, those of the aten ops torch.onnx lacks, and those of the library ops
    registered in this process.

    Example:
        >>> table = translation_table()
        >>> torch.ops.qzo.dequantize.default in table
        True
    """
    table = {**EMITTERS, **ATEN_EMITTERS}
    for (namespace, name), emitter in _LIBRARY_EMITTERS:
        target = _library_op(namespace, name)
        if target is not None:
            table[target] = emitter
    return table
