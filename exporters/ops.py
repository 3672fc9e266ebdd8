"""Export-form q/dq ops: what the lowering passes leave in a graph for the ONNX emitters.

* ``qzo::dequantize`` (defined in :mod:`qzo_fx.quant.ops`, shared with integer-code training) --
  integer weights stored as codes; emits DequantizeLinear on an integer initializer.
* ``qzo::quantize_dequantize(x, scale, zero_point, qmin, qmax)`` -- activations, per tensor;
  emits QuantizeLinear -> (Clip) -> DequantizeLinear. ``zero_point`` carries the storage type.
* ``qzo::sign_dequantize(x, scale)`` -- 1-bit activations: ``scale * sign(x)``, sign(0) = +1.

Their eager kernels compute exactly what ``qzo.fake_quant`` computes in eval mode (same float
operations in the same order), so the lowered model is the model that was trained.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qzo_fx.quant.ops import fake_quant_kernel, fake_sign_kernel

__all__ = ["quantize_dequantize", "sign_dequantize"]


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
