"""Op -> ONNX emitter registry for the export-form ops (onnxscript, traced by torch.onnx).

Every other op is translated by torch.onnx itself; only these need a rule: the q/dq ops (integer
storage types come from the initializers, so one emitter serves int8, uint8 and, after packing,
int4/uint4), and the ONNX Runtime kernels MatMulNBits and GatherBlockQuantized (com.microsoft).
"""
from __future__ import annotations

from typing import Callable

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript import opset21 as op21
from onnxscript.values import Op, Opset

import qzo_fx.exporters.gather_quantized  # noqa: F401  (registers the quantized gathers)
import qzo_fx.exporters.matmul_nbits  # noqa: F401  (registers qzo.matmul_nbits)
import qzo_fx.exporters.ops  # noqa: F401  (registers the export-form q/dq ops)

__all__ = ["EMITTERS", "register_emitter"]

EMITTERS: dict[object, Callable] = {}
_FULL_RANGES = ((-128, 127), (0, 255))  # int8 / uint8 activation storage


def _contrib_op(name: str, inputs: list[tuple[str, str, bool]], types: dict[str, list[str]], attributes: list[str],
                output_type: str = "T1") -> Op:
    """An ONNX Runtime contributed operator (com.microsoft), whose schema onnx does not ship:
    ``inputs`` are ``(name, type variable, optional)``, every attribute an int."""
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        name, "com.microsoft", 1,
        inputs=[param(n, t, param_option=optional) if opt else param(n, t) for n, t, opt in inputs],
        outputs=[param("Y", output_type)],
        type_constraints=[(t, allowed, "") for t, allowed in types.items()],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attributes])
    return Op(Opset("com.microsoft", 1), name, schema)


_MATMUL_NBITS = _contrib_op(
    "MatMulNBits", [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True)],
    {"T1": ["tensor(float)", "tensor(float16)"], "T2": ["tensor(uint8)"], "T3": ["tensor(uint8)"]},
    ["K", "N", "bits", "block_size", "accuracy_level"])
_GATHER_BLOCK_QUANTIZED = _contrib_op(
    "GatherBlockQuantized", [("data", "T1", False), ("indices", "Tind", False), ("scales", "T2", False),
                             ("zero_points", "T1", True)],
    {"T1": ["tensor(uint8)"], "Tind": ["tensor(int64)", "tensor(int32)"], "T2": ["tensor(float)", "tensor(float16)"]},
    ["gather_axis", "quantize_axis", "block_size", "bits"], output_type="T2")


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


@register_emitter(torch.ops.qzo.matmul_nbits.default)
def emit_matmul_nbits(x, packed, scales, zero_points, bias, k: int, n: int, bits: int, block_size: int):
    # accuracy_level 0: fp32 arithmetic (the levels above quantize the activations to int8).
    inputs = (x, packed, scales) if zero_points is None else (x, packed, scales, zero_points)
    y = _MATMUL_NBITS(*inputs, K=k, N=n, bits=bits, block_size=block_size, accuracy_level=0)
    return y if bias is None else op.Add(y, bias)


@register_emitter(torch.ops.qzo.gather_block_quantized.default)
def emit_gather_block_quantized(indices, data, scales, zero_points, bits: int, block_size: int):
    return _GATHER_BLOCK_QUANTIZED(data, indices, scales, zero_points, gather_axis=0, quantize_axis=1,
                                   block_size=block_size, bits=bits)


@register_emitter(torch.ops.qzo.gather_rows_dequantize.default)
def emit_gather_rows_dequantize(indices, codes, scale, zero_point):
    # Gather the rows first, dequantize only those: [..., D] -> [..., blocks, D / blocks].
    rows = op.Cast(op.Gather(codes, indices, axis=0), to=onnx.TensorProto.FLOAT)
    grouped_shape = op.Concat(op.Shape(indices), op.Shape(scale, start=1), op.Constant(value_ints=[-1]), axis=0)
    grouped = op.Reshape(rows, grouped_shape)
    shift = op.Unsqueeze(op.Cast(op.Gather(zero_point, indices, axis=0), to=onnx.TensorProto.FLOAT), [-1])
    step = op.Unsqueeze(op.Gather(scale, indices, axis=0), [-1])
    return op.Reshape(op.Mul(op.Sub(grouped, shift), step), op.Shape(rows))
