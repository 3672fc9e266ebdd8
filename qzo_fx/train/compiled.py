"""Optional compiled kernels: :mod:`qzo_fx.train.numba_kernels`, loaded on first use.

Importing numba and its on-disk cache costs ~0.3 s, which only steps that use a kernel should
pay; without numba every kernel is None and callers take their torch/numpy path.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

__all__ = ["kernel"]


@functools.cache
def kernel(name: str) -> Optional[Callable]:
    try:
        import numba
        from qzo_fx.train import numba_kernels
    except ImportError:
        return None
    compiled = getattr(numba_kernels, name)
    if not compiled.targetoptions.get("parallel"):
        return compiled
    # numba's OpenMP pool is torch's (one libgomp per process), and it sets the thread count
    # before each parallel region: run with torch's count, so torch.get_num_threads() is the
    # user's before and after.
    most = numba.config.NUMBA_NUM_THREADS

    @functools.wraps(compiled)
    def with_torch_threads(*args):
        threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(threads, most)))
        try:
            return compiled(*args)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return with_torch_threads
