"""Scale and zero-point initialisation (max-abs, MSE search, percentile).

All three reduce a tensor onto the scale layout of :mod:`qzo_fx.quant.ops` (0-d per tensor, 1-d per
channel, blocked per group) and return ``(scale, zero_point)`` in that layout.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from qzo_fx.config import QuantSpec
from qzo_fx.errors import CalibrationError
from qzo_fx.quant.scale_grid import grid_ceil, grid_floor

__all__ = ["init_scale"]

MIN_SCALE = 1e-8
# A scale floor: one number, or one per scale entry (a weight's channels).
Floor = Union[float, Tensor]
_MSE_RATIOS = torch.linspace(0.2, 1.0, 41)


def _slices(x: Tensor, axis: int, group_size: int, granularity: str) -> Tensor:
    """View ``x`` as ``[*scale_shape, n]``: the last dim holds what one scale entry covers."""
    if granularity == "per_tensor":
        return x.reshape(-1)
    if granularity == "per_channel":
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    moved = x.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group_size, group_size)


def _restore(values: Tensor, axis: int, granularity: str) -> Tensor:
    return values.movedim(-1, axis) if granularity == "per_group" else values


def _fake_quant_last(t: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    return (torch.round(t / s) + z).clamp(qmin, qmax).sub(z).mul(s)


def _symmetric(t: Tensor, spec: QuantSpec, amax: Callable[[Tensor], Tensor], min_scale: Floor) -> tuple[Tensor, Tensor]:
    qmin, qmax = spec.qrange
    if spec.bits == 1:
        # The L2-optimal step of scale * sign(x) is mean |x| (XNOR-Net); all inits agree on it.
        scale = t.abs().mean(-1)
        return scale.clamp_min(min_scale), torch.zeros_like(scale)
    scale = (amax(t.abs()) / qmax).clamp_min(min_scale)
    zero = torch.zeros_like(scale)
    if spec.scale_init == "mse":
        scale = _mse_search(t, scale, zero, qmin, qmax, min_scale)
    return _on_grid(t, scale, torch.zeros_like, qmin, qmax, spec.grid_bits, min_scale)


def _asymmetric(t: Tensor, spec: QuantSpec, min_scale: Floor) -> tuple[Tensor, Tensor]:
    qmin, qmax = spec.qrange
    if spec.scale_init == "percentile":
        low = _quantile(t, 1.0 - spec.percentile / 100.0)
        high = _quantile(t, spec.percentile / 100.0)
    else:
        low, high = t.amin(-1), t.amax(-1)
    low, high = low.clamp_max(0.0), high.clamp_min(0.0)  # the grid must hold an exact 0
    scale = ((high - low) / (qmax - qmin)).clamp_min(min_scale)

    def zero_of(step: Tensor) -> Tensor:
        zero = (qmin - torch.round(low / step)).clamp(qmin, qmax)
        # On a scale grid, values land exactly on halves (a 2x2 average of codes), and kernels that
        # add the zero point before rounding (ORT's QLinearAveragePool) round a half to even on
        # q + z, QuantizeLinear on q: they agree when z is even.
        return zero - zero.remainder(2) if spec.grid_bits else zero

    if spec.scale_init == "mse":
        scale = _mse_search(t, scale, zero_of(scale), qmin, qmax, min_scale)
    return _on_grid(t, scale, zero_of, qmin, qmax, spec.grid_bits, min_scale)


def _on_grid(t: Tensor, scale: Tensor, zero_of: Callable[[Tensor], Tensor], qmin: int, qmax: int, bits: int,
             min_scale: Floor) -> tuple[Tensor, Tensor]:
    """``(scale, zero)`` with each scale entry moved to its neighbour on the ``bits`` grid (below
    or above) that quantizes ``t`` with the smaller squared error; unchanged for ``bits = 0``."""
    if not bits:
        return scale, zero_of(scale)
    above = grid_ceil(scale, bits)
    below = grid_floor(scale, bits)
    below = torch.where(below < min_scale, above, below)
    errors = [(_fake_quant_last(t, s.unsqueeze(-1), zero_of(s).unsqueeze(-1), qmin, qmax) - t).square().sum(-1)
              for s in (below, above)]
    scale = torch.where(errors[0] < errors[1], below, above)
    return scale, zero_of(scale)


def _mse_search(t: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, min_scale: Floor) -> Tensor:
    """Shrink each scale entry by the ratio (of a fixed grid) that minimises the squared error."""
    best_err = torch.full_like(scale, float("inf"))
    best = scale.clone()
    for ratio in _MSE_RATIOS.tolist():
        candidate = (scale * ratio).clamp_min(min_scale)
        err = (_fake_quant_last(t, candidate.unsqueeze(-1), zero.unsqueeze(-1), qmin, qmax) - t).square().sum(-1)
        better = err < best_err
        best = torch.where(better, candidate, best)
        best_err = torch.where(better, err, best_err)
    return best


def _quantile(t: Tensor, q: float) -> Tensor:
    n = t.shape[-1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return t.kthvalue(k, dim=-1).values


def init_scale(x: Tensor, spec: QuantSpec, axis: int = 0, group_size: int = 0,
               name: str = "tensor", min_scale: Floor = MIN_SCALE) -> tuple[Tensor, Tensor]:
    """Initial ``(scale, zero_point)`` of ``x`` for ``spec``, in the layout of :mod:`qzo_fx.quant.ops`;
    no scale entry below ``min_scale``.

    Example:
        >>> s, z = init_scale(torch.tensor([[-1.0, 0.5], [2.0, -4.0]]), QuantSpec(bits=8))
        >>> s.shape, float(z.abs().sum())
        (torch.Size([2]), 0.0)
    """
    if x.numel() == 0:
        raise CalibrationError(f"{name}: cannot initialise a scale from an empty tensor.")
    if not torch.isfinite(x).all():
        raise CalibrationError(f"{name}: holds NaN or inf values; scales cannot be initialised from it.")
    t = _slices(x.detach().float(), axis, group_size, spec.granularity)
    if spec.symmetric:
        percentile = spec.percentile / 100.0 if spec.scale_init == "percentile" else None
        amax = (lambda a: _quantile(a, percentile)) if percentile is not None else (lambda a: a.amax(-1))
        scale, zero = _symmetric(t, spec, amax, min_scale)
    else:
        scale, zero = _asymmetric(t, spec, min_scale)
    return _restore(scale, axis, spec.granularity).contiguous(), _restore(zero, axis, spec.granularity).contiguous()
