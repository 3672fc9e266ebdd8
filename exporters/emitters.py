"""Op -> ONNX emitter registry for the export-form q/dq ops (onnxscript, traced by torch.onnx).

Every other op is translated by torch.onnx itself; only these need a rule. Integer storage
types come from the initializers (codes, zero points), so one emitter serves int8, uint8 and,
after packing, int4/uint4.
"""
from __future__ import annotations

from typing import Callable

import torch
from onnxscript import opset18 as op
from onnxscript import opset21 as op21

import qzo_fx.exporters.ops  # noqa: F401  (registers the export-form ops)

__all__ = ["EMITTERS", "register_emitter"]

EMITTERS: dict[object, Callable] = {}
_FULL_RANGES = ((-128, 127), (0, 255))  # int8 / uint8 activation storage


def register_emitter(target: object) -> Callable[[Callable], Callable]:
    """Decorator: ``@register_emitter(torch.ops.ns.op.default)`` adds an emitter."""
    def add(fn: Callable) -> Callable:
        EMITTERS[target] = fn
        return fn
    return add


@register_emitter(torch.ops.qzo.dequantize.default)
def emit_dequantize(codes, scale, zero_point, axis: int, block_size: int):
    if block_size > 0:  # blocked (per-group) layout: opset 21
        return op21.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)
    # The opset-18 schema: valid in any opset >= 13 file, and its nodes carry no block_size.
    return op.DequantizeLinear(codes, scale, zero_point, axis=axis)


@register_emitter(torch.ops.qzo.quantize_dequantize.default)
def emit_quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int):
    q = op.QuantizeLinear(x, scale, zero_point)
    if (qmin, qmax) not in _FULL_RANGES:
        # The storage type saturates at its own range; a narrower grid needs a Clip (QCDQ).
        q = op.Clip(q, op.CastLike(op.Constant(value_int=qmin), q), op.CastLike(op.Constant(value_int=qmax), q))
    return op.DequantizeLinear(q, scale, zero_point)


@register_emitter(torch.ops.qzo.sign_dequantize.default)
def emit_sign_dequantize(x, scale):
    zero = op.CastLike(op.Constant(value_float=0.0), x)
    return op.Where(op.GreaterOrEqual(x, zero), op.Expand(scale, op.Shape(x)), op.Neg(op.Expand(scale, op.Shape(x))))
