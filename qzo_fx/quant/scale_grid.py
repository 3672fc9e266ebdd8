"""Scales on a short binary grid: ``m * 2^e`` with ``m`` of ``bits`` significant bits.

Why: a float kernel sums ``(q_x - z_x) s_x * q_w s_w`` in float32, an integer kernel sums
``(q_x - z_x) q_w`` in int32 and multiplies by ``s_x s_w / s_y`` once. With ``s_x``, ``s_y`` powers
of two and ``s_w`` of 4 significant bits, every product and every partial sum below 2^20 code
units is exact in float32, so both kernels land on the same value before rounding, and a value
within float noise of a rounding boundary takes the same code in both (see
:attr:`qzo_fx.QuantConfig.exact_scales`).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grid_floor", "grid_ceil"]


def _mantissa(scale: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(u, p)`` with ``scale = u p``, ``u`` in [2^(bits-1), 2^bits) and ``p`` a power of two.

    ``log2`` only guesses the exponent; one step of correction each way makes it exact, and the
    ops are plain ones that torch.onnx translates (the kernels are traced into unfolded exports)."""
    power = torch.pow(2.0, torch.floor(torch.log2(scale)))
    power = torch.where(power > scale, power / 2, power)
    power = torch.where(power * 2 <= scale, power * 2, power)
    unit = power / 2.0 ** (bits - 1)
    return scale / unit, unit


def grid_floor(scale: Tensor, bits: int) -> Tensor:
    """The largest grid value at or below each positive ``scale`` entry.

    Example:
        >>> grid_floor(torch.tensor([0.3, 1.0, 3.0]), 1).tolist()
        [0.25, 1.0, 2.0]
    """
    units, unit = _mantissa(scale, bits)
    return units.floor() * unit


def grid_ceil(scale: Tensor, bits: int) -> Tensor:
    """The smallest grid value at or above each positive ``scale`` entry.

    Example:
        >>> grid_ceil(torch.tensor([0.3, 1.0, 3.0]), 1).tolist()
        [0.5, 1.0, 4.0]
        >>> grid_ceil(torch.tensor([0.3]), 4).tolist()   # 0.3 = 0.6 * 2^-1 -> 10/16 * 2^-1
        [0.3125]
    """
    units, unit = _mantissa(scale, bits)
    return units.ceil() * unit

