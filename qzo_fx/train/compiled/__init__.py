"""The optional CPU backend: numba kernels that do in one pass what torch does in several.

Installed with the ``compiled`` extra (``pip install qzo-fx[compiled]``). Nothing needs it:
without numba :func:`kernel` returns None and the step takes its torch path. Each kernel has a
plain-torch definition that the tests hold it to (bit for bit): the counter stream of
:mod:`qzo_fx.train.counter`, and the perturbed q/dq of ``fake_quant_kernel(theta + sign * v * eps)``.
Importing numba and its on-disk cache costs ~0.3 s, paid on the first use only.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Optional

import torch

__all__ = ["available", "kernel", "disabled"]

_DISABLE = "QZO_FX_NO_COMPILED"  # set to 1: behave as if numba were not installed
_DISABLED: set[str] = set()      # kernels switched off for a while (A/B measurements)


@functools.cache
def _kernels():
    if os.environ.get(_DISABLE) == "1":
        return None
    try:
        import numba  # noqa: F401

        from qzo_fx.train.compiled import kernels
    except ImportError:
        return None
    return kernels


def available() -> bool:
    """True where the compiled kernels can run (numba importable, not disabled)."""
    return _kernels() is not None


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Run without the kernels ``names`` (their torch paths instead), e.g. to time what they save."""
    added = [n for n in names if n not in _DISABLED]
    _DISABLED.update(added)
    try:
        yield
    finally:
        _DISABLED.difference_update(added)


def kernel(name: str) -> Optional[Callable]:
    """The compiled kernel ``name``, or None without numba (or while it is disabled)."""
    return None if name in _DISABLED else _loaded(name)


@functools.cache
def _loaded(name: str) -> Optional[Callable]:
    kernels = _kernels()
    if kernels is None:
        return None
    compiled = getattr(kernels, name)
    if not compiled.targetoptions.get("parallel"):
        return compiled
    import numba

    # numba's OpenMP pool is torch's (one libgomp per process), and it sets the thread count
    # before each parallel region: run with torch's count, and leave torch's as the user set it.
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
