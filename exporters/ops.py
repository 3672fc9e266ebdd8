"""Export-form q/dq ops: what the lowering passes leave in a graph for the ONNX emitters.

* ``qzo::dequantize(codes, scale, zero_point, axis, block_size)`` -- integer weights stored as
  codes: ``(codes - zero_point) * scale``; emits DequantizeLinear on an integer initializer.
* ``qzo::quantize_dequantize(x, scale, zero_point, qmin, qmax)`` -- activations, per tensor;
  emits QuantizeLinear -> (Clip) -> DequantizeLinear. ``zero_point`` carries the storage type.
* ``qzo::sign_dequantize(x, scale)`` -- 1-bit activations: ``scale * sign(x)``, sign(0) = +1.

Their eager kernels compute exactly what ``qzo.fake_quant`` computes in eval mode (same float
operations in the same order), so the lowered model is the model that was trained.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qzo_fx.ops import expand_param, fake_quant_kernel, fake_sign_kernel

__all__ = ["dequantize", "quantize_dequantize", "sign_dequantize"]


@torch.library.custom_op("qzo::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int) -> Tensor:
    group = block_size if block_size > 0 else 0
    s = expand_param(scale, codes, axis, group)
    z = expand_param(zero_point, codes, axis, group)
    return (codes.to(scale.dtype) - z.to(scale.dtype)) * s  # q - 0 is exact: symmetric stays q * s


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size):
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


@torch.library.custom_op("qzo::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    return fake_quant_kernel(x, scale, zero_point.to(scale.dtype), qmin, qmax, -1, 0)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qzo::sign_dequantize", mutates_args=())
def sign_dequantize(x: Tensor, scale: Tensor) -> Tensor:
    return fake_sign_kernel(x, scale, -1, 0).expand_as(x).clone()


@sign_dequantize.register_fake
def _(x, scale):
    return torch.empty_like(x)
