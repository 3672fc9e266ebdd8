"""The eval graph's BatchNorm, computed as the exported file computes it: folded.

Export folds an eval-mode BatchNorm into the conv or linear before it:
``BN(conv(x, W) + b) = conv(x, W k) + B`` with ``k = gamma / sqrt(var + eps)`` and
``B = (b - mean) k + beta``. The file stores the weight codes with the scale ``s_w k`` and ``B``
as int32 codes at ``s_x s_w k`` (an integer kernel adds it to its accumulator so; a float ``B``
would be rounded by ONNX Runtime there, see :mod:`qzo_fx.exporters.fold_batchnorm`).

Computed unfolded, ``conv`` then ``BN`` differs from the file by a float rounding or two in every
output; an activation that lands within that distance of a rounding boundary takes the
neighbouring code, and a random-init network carries one such code to several output steps.
So the eval graph computes the folded form with the file's operations in the file's order: the
weight is ``(q - z) * (s_w k)`` (the codes recovered exactly from the fake-quantized weight,
``round(w_fq / s_w)``), the bias is ``round(B / step) * step``.

With a scale grid (``QuantConfig.exact_scales``) the file's scale is the grid value ``S`` at or
above ``s_w k``, and the codes are refolded onto it, ``round(q (s_w k) / S)``: never larger than
``q``, so nothing clips, and the products of codes and scales stay exact in float32 (see
:mod:`qzo_fx.quant.scale_grid`).

Where some ``k <= 0`` the codes cannot take the fold (negative or zero scales): the weight is then
``w_fq * k`` and the bias ``B`` in float, which the file computes with the same operations (a Mul
after the weight's DequantizeLinear). Either way there is no BatchNorm left to compute on the
activations. Gradients are those of the unfolded form seen straight through the roundings
(``dW k``; ``k`` and ``B`` differentiate in ``gamma``, ``beta`` and the conv bias), so training in
eval mode still works.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qzo_fx.passes.prepare.quantize_bias import BIAS_QRANGE
from qzo_fx.quant.ops import expand_param, grid_codes
from qzo_fx.quant.scale_grid import grid_ceil

__all__ = ["batchnorm_scale", "folded_weight", "folded_bias", "folded_bias_parts", "folded_weight_scale",
           "refolded_codes", "foldable", "batchnorm_affine", "batchnorm_affine_kernel", "FOLDING_OPS",
           "folded_weight_kernel", "folded_bias_kernel"]


def batchnorm_scale(var: Tensor, gamma: Optional[Tensor], eps: float) -> Tensor:
    """``k = gamma / sqrt(var + eps)`` per channel, in the exporter's order of operations."""
    return (gamma if gamma is not None else 1.0) / torch.sqrt(var + eps)


def folded_weight_scale(weight_scale: Tensor, k: Tensor, scale_bits: int = 0) -> Tensor:
    """The exported DequantizeLinear scale (per output channel): ``s_w k``, or with ``scale_bits``
    the grid value at or above it."""
    exact = weight_scale * k.reshape((-1,) + (1,) * max(weight_scale.dim() - 1, 0)) if weight_scale.dim() \
        else weight_scale * k
    return grid_ceil(exact, scale_bits) if scale_bits else exact


def refolded_codes(codes: Tensor, weight_scale: Tensor, k: Tensor, scale_bits: int) -> Tensor:
    """Centred codes ``q - z`` moved to the folded scale: ``q`` itself without a grid, else
    ``round(q (s_w k) / S)`` with ``S`` the grid scale (``|q'| <= |q|``: nothing clips).

    Example:
        >>> refolded_codes(torch.tensor([[40.0], [-7.0]]), torch.tensor(0.1), torch.tensor([1.0, 1.0]), 1).flatten()
        tensor([32., -6.])
    """
    if not scale_bits:
        return codes
    exact = folded_weight_scale(weight_scale, k)
    return torch.mul(codes, expand_param(exact / grid_ceil(exact, scale_bits), codes, 0, 0)).round_()


def folded_bias_parts(bias: Optional[Tensor], mean: Tensor, k: Tensor, beta: Optional[Tensor],
                      input_scale: Optional[Tensor], weight_scale: Optional[Tensor],
                      scale_bits: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """``(B, step)``: the folded bias ``(b - mean) k + beta`` and its int32 step, ``s_x`` times the
    folded weight scale (None without an integer kernel).

    Example:
        >>> B, step = folded_bias_parts(None, torch.zeros(2), torch.ones(2), torch.tensor([0.32, -0.11]),
        ...                             torch.tensor(0.1), torch.tensor([0.5, 0.25]))
        >>> [round(v, 4) for v in B.tolist()], [round(v, 4) for v in step.tolist()]
        ([0.32, -0.11], [0.05, 0.025])
    """
    b = bias if bias is not None else torch.zeros_like(k)
    shift = beta if beta is not None else torch.zeros_like(k)
    value = (b - mean) * k + shift
    if input_scale is None or weight_scale is None:
        return value, None
    return value, (input_scale * folded_weight_scale(weight_scale, k, scale_bits)).reshape(-1)


def foldable(k: Tensor) -> Tensor:
    """True (0-d) when every ``k > 0``: the fold then goes into the weight codes' scale."""
    return (k > 0).all()


def _channels(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


# The kernels, in two forms. The ops' own, on CPU, read ``foldable`` on the host and compute one
# branch: the weight-sized work is the cost of the fold, and a branch not taken would cost two
# more passes over the weights (on an accelerator the read would wait for the device at every
# BatchNorm, so there the ops take the other form). The plain-op forms (``torch.where``, no host
# read) are also what an export that keeps the ops (fold_batchnorm=False) traces into the file.
def _weight_codes(weight: Tensor, weight_scale: Tensor) -> Tensor:
    per_tensor = weight_scale.dim() == 0
    return torch.div(weight, weight_scale if per_tensor else expand_param(weight_scale, weight, 0, 0)).round_()


def _rounded_bias(value: Tensor, step: Tensor) -> Tensor:
    return grid_codes(value, step, torch.zeros_like(step), *BIAS_QRANGE).mul_(step)


def _folded_codes_weight(weight: Tensor, weight_scale: Tensor, k: Tensor, scale_bits: int) -> Tensor:
    codes = refolded_codes(_weight_codes(weight, weight_scale), weight_scale, k, scale_bits)
    return codes.mul_(expand_param(folded_weight_scale(weight_scale, k, scale_bits), weight, 0, 0))


def folded_weight_kernel(weight: Tensor, weight_scale: Optional[Tensor], var: Tensor, gamma: Optional[Tensor],
                         eps: float, scale_bits: int = 0) -> Tensor:
    k = batchnorm_scale(var, gamma, eps)
    scaled = weight * _channels(k, weight)
    if weight_scale is None:
        return scaled
    return torch.where(foldable(k), _folded_codes_weight(weight, weight_scale, k, scale_bits), scaled)


def folded_bias_kernel(bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                       beta: Optional[Tensor], eps: float, input_scale: Optional[Tensor],
                       weight_scale: Optional[Tensor], scale_bits: int = 0) -> Tensor:
    k = batchnorm_scale(var, gamma, eps)
    value, step = folded_bias_parts(bias, mean, k, beta, input_scale, weight_scale, scale_bits)
    return value if step is None else torch.where(foldable(k), _rounded_bias(value, step), value)


# Ops, not Python functions in the graph: GraphModule pickling traces the code again, and an op
# stays one node there (the exporter finds it by its target).
@torch.library.custom_op("qzo::folded_weight", mutates_args=())
def folded_weight(weight: Tensor, weight_scale: Optional[Tensor], var: Tensor, gamma: Optional[Tensor],
                  eps: float, scale_bits: int = 0) -> Tensor:
    """The weight as the file computes it: ``round(w_fq / s_w) * (s_w k)`` for a fake-quantized
    weight (per tensor or per output channel) whose ``k`` are all positive, else ``w k``; with
    ``scale_bits``, the codes refolded onto the grid scale (:func:`refolded_codes`).

    Example:
        >>> w = torch.tensor([[0.5], [-0.25]])                       # codes 2 and -1 at s_w = 0.25
        >>> folded_weight(w, torch.tensor(0.25), torch.tensor([3.0, 0.0]), None, 1.0).flatten().tolist()
        [0.25, -0.25]
    """
    if weight.device.type != "cpu":  # no host read per BatchNorm on an accelerator
        return folded_weight_kernel(weight, weight_scale, var, gamma, eps, scale_bits)
    k = batchnorm_scale(var, gamma, eps)
    if weight_scale is None or not bool(foldable(k)):
        return weight * _channels(k, weight)
    return _folded_codes_weight(weight, weight_scale, k, scale_bits)


@folded_weight.register_fake
def _(weight, weight_scale, var, gamma, eps, scale_bits=0):
    return torch.empty_like(weight)


def _folded_weight_setup(ctx, inputs, output) -> None:
    weight, weight_scale, var, gamma, eps = inputs[:5]
    k = batchnorm_scale(var.detach(), None if gamma is None else gamma.detach(), eps)
    ctx.has_gamma, ctx.eps = gamma is not None, eps
    ctx.save_for_backward(weight, var, k)


def _folded_weight_backward(ctx, grad: Tensor):
    # w k, its rounding seen straight through: d/dw = k, d/dgamma = w / sqrt(var + eps) per channel.
    weight, var, k = ctx.saved_tensors
    grad_gamma = None
    if ctx.has_gamma:
        grad_gamma = (grad * weight).reshape(grad.shape[0], -1).sum(1) / torch.sqrt(var + ctx.eps)
    return grad * _channels(k, grad), None, None, grad_gamma, None, None


folded_weight.register_autograd(_folded_weight_backward, setup_context=_folded_weight_setup)


@torch.library.custom_op("qzo::folded_bias", mutates_args=())
def folded_bias(bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                eps: float, input_scale: Optional[Tensor], weight_scale: Optional[Tensor],
                scale_bits: int = 0) -> Tensor:
    """The bias as the file adds it: ``B`` on the int32 grid at ``s_x s_w k`` (both scales given:
    an integer kernel, and every ``k > 0``), else ``B`` in float.

    Example:
        >>> B = folded_bias(None, torch.zeros(2), torch.ones(2), None, torch.tensor([0.32, -0.11]), 0.0,
        ...                 torch.tensor(0.1), torch.tensor([0.5, 0.25]))
        >>> [round(v, 4) for v in B.tolist()]   # on the steps 0.05 and 0.025
        [0.3, -0.1]
    """
    if var.device.type != "cpu":
        return folded_bias_kernel(bias, mean, var, gamma, beta, eps, input_scale, weight_scale, scale_bits)
    k = batchnorm_scale(var, gamma, eps)
    value, step = folded_bias_parts(bias, mean, k, beta, input_scale, weight_scale, scale_bits)
    return _rounded_bias(value, step) if step is not None and bool(foldable(k)) else value


@folded_bias.register_fake
def _(bias, mean, var, gamma, beta, eps, input_scale, weight_scale, scale_bits=0):
    return torch.empty_like(var)


def _folded_bias_setup(ctx, inputs, output) -> None:
    bias, mean, var, gamma, beta, eps, input_scale, weight_scale = inputs[:8]
    k = batchnorm_scale(var.detach(), None if gamma is None else gamma.detach(), eps)
    ctx.flags = (bias is not None, gamma is not None, beta is not None)
    b = bias.detach() if bias is not None else torch.zeros_like(k)
    ctx.save_for_backward(k, (b - mean) / torch.sqrt(var + eps))


def _folded_bias_backward(ctx, grad: Tensor):
    # B = (b - mean) k + beta, its rounding seen straight through.
    k, centred = ctx.saved_tensors
    has_bias, has_gamma, has_beta = ctx.flags
    return (grad * k if has_bias else None, None, None, grad * centred if has_gamma else None,
            grad if has_beta else None, None, None, None, None)


folded_bias.register_autograd(_folded_bias_backward, setup_context=_folded_bias_setup)



def batchnorm_affine_kernel(x: Tensor, mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                            eps: float) -> Tensor:
    k = batchnorm_scale(var, gamma, eps)
    shift = -(mean * k) if beta is None else beta - mean * k
    shape = (-1,) + (1,) * (x.dim() - 2)
    return x * k.reshape(shape) + shift.reshape(shape)


@torch.library.custom_op("qzo::batchnorm_affine", mutates_args=())
def batchnorm_affine(x: Tensor, mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                     eps: float) -> Tensor:
    """An eval-mode BatchNorm as one multiply and one add per element, ``x k + (beta - mean k)``
    (channels on dim 1): two IEEE roundings that every runtime computes alike, where BatchNorm
    kernels differ in their order of operations (see
    :mod:`qzo_fx.passes.prepare.affine_eval_batchnorm`).

    Example:
        >>> batchnorm_affine(torch.tensor([[1.0, 2.0]]), torch.zeros(2), torch.full((2,), 3.0), None,
        ...                  torch.tensor([0.5, 0.0]), 1.0).tolist()
        [[1.0, 1.0]]
    """
    return batchnorm_affine_kernel(x, mean, var, gamma, beta, eps)


@batchnorm_affine.register_fake
def _(x, mean, var, gamma, beta, eps):
    return torch.empty_like(x)


def _batchnorm_affine_setup(ctx, inputs, output) -> None:
    x, mean, var, gamma, beta, eps = inputs
    ctx.flags = (gamma is not None, beta is not None)
    k = batchnorm_scale(var.detach(), None if gamma is None else gamma.detach(), eps)
    ctx.save_for_backward(x, mean, var, k)
    ctx.eps = eps


def _batchnorm_affine_backward(ctx, grad: Tensor):
    x, mean, var, k = ctx.saved_tensors
    has_gamma, has_beta = ctx.flags
    shape = (-1,) + (1,) * (grad.dim() - 2)
    others = [d for d in range(grad.dim()) if d != 1]
    grad_gamma = (grad * (x - mean.reshape(shape))).sum(others) / torch.sqrt(var + ctx.eps) if has_gamma else None
    return grad * k.reshape(shape), None, None, grad_gamma, grad.sum(others) if has_beta else None, None


batchnorm_affine.register_autograd(_batchnorm_affine_backward, setup_context=_batchnorm_affine_setup)

FOLDING_OPS = {torch.ops.qzo.folded_weight.default: folded_weight_kernel,
               torch.ops.qzo.folded_bias.default: folded_bias_kernel,
               torch.ops.qzo.batchnorm_affine.default: batchnorm_affine_kernel}
