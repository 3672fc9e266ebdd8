"""Optional compiled kernels: :mod:`qzo_fx.numba_kernels`, loaded on first use.

Importing numba and its on-disk cache costs ~0.3 s, which only steps that use a kernel should
pay; without numba every kernel is None and callers take their torch/numpy path.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

__all__ = ["kernel"]


@functools.cache
def kernel(name: str) -> Optional[Callable]:
    try:
        from qzo_fx import numba_kernels
    except ImportError:
        return None
    return getattr(numba_kernels, name)
