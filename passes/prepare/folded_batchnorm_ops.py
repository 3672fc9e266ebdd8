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

Where some ``k <= 0`` the file keeps the BatchNorm (a fold would need negative or zero scales):
the ops then return their inputs and :func:`batchnorm_foldable` selects the BatchNorm's output.
Gradients are those of the unfolded form seen straight through the roundings (``dW k``; ``k``
and ``B`` differentiate in ``gamma``, ``beta`` and the conv bias), so training in eval mode still
works.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qzo_fx.passes.prepare.quantize_bias import BIAS_QRANGE
from qzo_fx.quant.ops import expand_param, grid_codes

__all__ = ["batchnorm_scale", "folded_weight", "folded_bias", "batchnorm_foldable", "folded_bias_parts",
           "folded_weight_scale", "FOLDING_OPS", "foldable_kernel", "folded_weight_kernel",
           "folded_bias_kernel"]

def batchnorm_scale(var: Tensor, gamma: Optional[Tensor], eps: float) -> Tensor:
    """``k = gamma / sqrt(var + eps)`` per channel, in the exporter's order of operations."""
    return (gamma if gamma is not None else 1.0) / torch.sqrt(var + eps)


def folded_weight_scale(weight_scale: Tensor, k: Tensor) -> Tensor:
    """``s_w k`` in the layout of the exported DequantizeLinear scale (per output channel)."""
    return weight_scale * k.reshape((-1,) + (1,) * max(weight_scale.dim() - 1, 0)) if weight_scale.dim() \
        else weight_scale * k


def folded_bias_parts(bias: Optional[Tensor], mean: Tensor, k: Tensor, beta: Optional[Tensor],
                      input_scale: Optional[Tensor], weight_scale: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``(B, step)``: the folded bias ``(b - mean) k + beta`` and its int32 step ``s_x (s_w k)``
    (None without an integer kernel).

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
    return value, (input_scale * folded_weight_scale(weight_scale, k)).reshape(-1)


def _foldable(k: Tensor, quantized: bool) -> Tensor:
    # A float weight takes any k; quantized codes need positive scales s_w k.
    return (k > 0).all() if quantized else torch.ones((), dtype=torch.bool, device=k.device)


def _channels(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


# The kernels: plain ops (torch.where, no host read), so that an export that keeps them
# (fold_batchnorm=False) traces them into the file as they are.
def foldable_kernel(var: Tensor, gamma: Optional[Tensor], eps: float, quantized: bool) -> Tensor:
    return _foldable(batchnorm_scale(var, gamma, eps), quantized)


def folded_weight_kernel(weight: Tensor, weight_scale: Optional[Tensor], var: Tensor, gamma: Optional[Tensor],
                         eps: float) -> Tensor:
    k = batchnorm_scale(var, gamma, eps)
    if weight_scale is None:
        return weight * _channels(k, weight)
    per_tensor = weight_scale.dim() == 0
    codes = torch.div(weight, weight_scale if per_tensor else expand_param(weight_scale, weight, 0, 0)).round()
    folded = codes * expand_param(folded_weight_scale(weight_scale, k), weight, 0, 0)
    return torch.where(_foldable(k, True), folded, weight)


def folded_bias_kernel(bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                       beta: Optional[Tensor], eps: float, input_scale: Optional[Tensor],
                       weight_scale: Optional[Tensor]) -> Tensor:
    k = batchnorm_scale(var, gamma, eps)
    value, step = folded_bias_parts(bias, mean, k, beta, input_scale, weight_scale)
    if step is not None:
        value = grid_codes(value, step, torch.zeros_like(step), *BIAS_QRANGE) * step
    kept = bias if bias is not None else torch.zeros_like(k)
    return torch.where(_foldable(k, weight_scale is not None), value, kept)


# Ops, not Python functions in the graph: GraphModule pickling traces the code again, and an op
# stays one node there (the exporter finds it by its target).
@torch.library.custom_op("qzo::batchnorm_foldable", mutates_args=())
def batchnorm_foldable(var: Tensor, gamma: Optional[Tensor], eps: float, quantized: bool) -> Tensor:
    """True (a 0-d bool tensor) when export folds this BatchNorm: every ``k > 0`` for quantized
    weights, always for float ones."""
    return foldable_kernel(var.detach(), None if gamma is None else gamma.detach(), eps, quantized)


@batchnorm_foldable.register_fake
def _(var, gamma, eps, quantized):
    return torch.empty((), dtype=torch.bool, device=var.device)


@torch.library.custom_op("qzo::folded_weight", mutates_args=())
def folded_weight(weight: Tensor, weight_scale: Optional[Tensor], var: Tensor, gamma: Optional[Tensor],
                  eps: float) -> Tensor:
    """The weight as the file dequantizes it: ``round(w_fq / s_w) * (s_w k)`` for a fake-quantized
    weight (per tensor or per output channel), ``w k`` for a float one; ``w`` itself where the
    file keeps the BatchNorm.

    Example:
        >>> w = torch.tensor([[0.5], [-0.25]])                       # codes 2 and -1 at s_w = 0.25
        >>> folded_weight(w, torch.tensor(0.25), torch.tensor([3.0, 0.0]), None, 1.0).flatten().tolist()
        [0.25, -0.25]
    """
    return folded_weight_kernel(weight, weight_scale, var, gamma, eps)


@folded_weight.register_fake
def _(weight, weight_scale, var, gamma, eps):
    return torch.empty_like(weight)


def _folded_weight_setup(ctx, inputs, output) -> None:
    weight, weight_scale, var, gamma, eps = inputs
    k = batchnorm_scale(var.detach(), None if gamma is None else gamma.detach(), eps)
    ctx.has_gamma, ctx.eps = gamma is not None, eps
    ctx.save_for_backward(weight, var, k, _foldable(k, weight_scale is not None))


def _folded_weight_backward(ctx, grad: Tensor):
    weight, var, k, folded = ctx.saved_tensors
    grad_weight = torch.where(folded, grad * _channels(k, grad), grad)
    grad_gamma = None
    if ctx.has_gamma:  # d(w k)/d gamma = w / sqrt(var + eps), summed over each channel
        per_channel = (grad * weight).reshape(grad.shape[0], -1).sum(1) / torch.sqrt(var + ctx.eps)
        grad_gamma = torch.where(folded, per_channel, torch.zeros_like(per_channel))
    return grad_weight, None, None, grad_gamma, None


folded_weight.register_autograd(_folded_weight_backward, setup_context=_folded_weight_setup)


@torch.library.custom_op("qzo::folded_bias", mutates_args=())
def folded_bias(bias: Optional[Tensor], mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                eps: float, input_scale: Optional[Tensor], weight_scale: Optional[Tensor]) -> Tensor:
    """The bias as the file adds it: ``B`` on the int32 grid at ``s_x s_w k`` (both scales given:
    an integer kernel), else ``B`` in float; the conv's own bias (or 0) where the file keeps the
    BatchNorm.

    Example:
        >>> B = folded_bias(None, torch.zeros(2), torch.ones(2), None, torch.tensor([0.32, -0.11]), 0.0,
        ...                 torch.tensor(0.1), torch.tensor([0.5, 0.25]))
        >>> [round(v, 4) for v in B.tolist()]   # on the steps 0.05 and 0.025
        [0.3, -0.1]
    """
    return folded_bias_kernel(bias, mean, var, gamma, beta, eps, input_scale, weight_scale)


@folded_bias.register_fake
def _(bias, mean, var, gamma, beta, eps, input_scale, weight_scale):
    return torch.empty_like(var)


def _folded_bias_setup(ctx, inputs, output) -> None:
    bias, mean, var, gamma, beta, eps, input_scale, weight_scale = inputs
    k = batchnorm_scale(var.detach(), None if gamma is None else gamma.detach(), eps)
    ctx.flags = (bias is not None, gamma is not None, beta is not None)
    b = bias.detach() if bias is not None else torch.zeros_like(k)
    ctx.save_for_backward(k, (b - mean) / torch.sqrt(var + eps), _foldable(k, weight_scale is not None))


def _folded_bias_backward(ctx, grad: Tensor):
    k, centred, folded = ctx.saved_tensors
    has_bias, has_gamma, has_beta = ctx.flags
    zero = torch.zeros_like(grad)
    # Folded: B = (b - mean) k + beta, its rounding seen straight through; kept: the conv's bias.
    return (torch.where(folded, grad * k, grad) if has_bias else None, None, None,
            torch.where(folded, grad * centred, zero) if has_gamma else None,
            torch.where(folded, grad, zero) if has_beta else None, None, None, None)


folded_bias.register_autograd(_folded_bias_backward, setup_context=_folded_bias_setup)

FOLDING_OPS = {torch.ops.qzo.batchnorm_foldable.default: foldable_kernel,
               torch.ops.qzo.folded_weight.default: folded_weight_kernel,
               torch.ops.qzo.folded_bias.default: folded_bias_kernel}
