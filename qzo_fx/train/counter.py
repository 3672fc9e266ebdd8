"""Counter-based streams: every value is a function of (key, position) alone.

Two things use them. The step's keys and signs: ``derive(seed, *path)`` mixes integers into a
64-bit key with SplitMix64's output function, in plain Python (a few microseconds, no device
work). And the CPU compiled backend's uniform noise (:mod:`qzo_fx.train.compiled`): level ``j``
of stream ``key`` is lane ``j % 4`` (16 bits) of ``mix(key + (j // 4 + 1) * GOLDEN)``, so any
slice of a stream costs its own length. :func:`uniform_levels` is that definition in plain torch
(int64 arithmetic wraps modulo 2**64); the compiled kernel must give the same bits.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GOLDEN", "M1", "M2", "HALF_LEVELS", "mix", "derive", "words", "uniform_levels"]

MASK64 = (1 << 64) - 1
GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
HALF_LEVELS = 32768.0  # 16-bit levels on each side of 0


def mix(z: int) -> int:
    """SplitMix64's output function (a bijection of 64-bit words)."""
    z = ((z ^ (z >> 30)) * M1) & MASK64
    z = ((z ^ (z >> 27)) * M2) & MASK64
    return z ^ (z >> 31)


def derive(seed: int, *path: int) -> int:
    """A 64-bit key for ``(seed, *path)``: independent streams for distinct paths."""
    key = mix(seed & MASK64)
    for part in path:
        key = mix((key + (part + 1) * GOLDEN) & MASK64)
    return key


def words(key: int, count: int) -> list[int]:
    """Words ``0 .. count - 1`` of stream ``key``."""
    return [mix((key + (w + 1) * GOLDEN) & MASK64) for w in range(count)]


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    """``z >> bits`` of the unsigned word that int64 ``z`` holds (torch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_levels(key: int, start: int, count: int, half_width: float, device=None) -> Tensor:
    """Values ``start .. start + count - 1`` of counter stream ``key`` as float32 levels on
    ``(-half_width, half_width)``: ``(level + 0.5) * half_width / 32768``, mean exactly 0."""
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z = (j // 4 + 1) * _signed(GOLDEN) + _signed(key)
    z = (z ^ _logical_shift(z, 30)) * _signed(M1)
    z = (z ^ _logical_shift(z, 27)) * _signed(M2)
    z = z ^ _logical_shift(z, 31)
    lane = (z >> (16 * (j % 4))) & 0xFFFF
    level = torch.where(lane >= 1 << 15, lane - (1 << 16), lane).to(torch.float32)
    return (level + 0.5) * torch.tensor(half_width / HALF_LEVELS, dtype=torch.float32)
