"""ONNX translations of the aten ops that models call and torch.onnx has no rule for.

``torch.cdist`` (nearest codebook entries of a VQ layer, prototype distances, k-nearest
neighbours) reaches the exported program as ``aten._cdist_forward`` for small inputs: ATen
itself routes larger Euclidean ones to matmuls, which torch.onnx translates. torch.onnx has no
rule for ``_cdist_forward``, so a model calling it could not be exported at all.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from onnxscript import opset18 as op

__all__ = ["ATEN_EMITTERS", "emit_cdist"]


def emit_cdist(x1, x2, p: float, compute_mode: Optional[int] = None):
    """``out[..., i, j] = ‖x1[..., i, :] − x2[..., j, :]‖_p``, from the differences, as the ATen
    kernel that this op names computes it (its matmul form is a different op, see above)."""
    rows, columns = op.Unsqueeze(x1, op.Constant(value_ints=[-2])), op.Unsqueeze(x2, op.Constant(value_ints=[-3]))
    diff = op.Abs(op.Sub(rows, columns))
    last = op.Constant(value_ints=[-1])
    if p == 0:  # the number of coordinates that differ
        return op.ReduceSum(op.CastLike(op.Greater(diff, op.CastLike(op.Constant(value_float=0.0), diff)), diff), last,
                            keepdims=0)
    if p == 1:
        return op.ReduceSum(diff, last, keepdims=0)
    if p == 2:
        return op.Sqrt(op.ReduceSum(op.Mul(diff, diff), last, keepdims=0))
    if math.isinf(p):
        return op.ReduceMax(diff, last, keepdims=0)
    power = op.CastLike(op.Constant(value_float=p), diff)
    root = op.CastLike(op.Constant(value_float=1.0 / p), diff)
    return op.Pow(op.ReduceSum(op.Pow(diff, power), last, keepdims=0), root)


ATEN_EMITTERS: dict[object, Callable] = {torch.ops.aten._cdist_forward.default: emit_cdist}
