"""Scratch tensors reused from step to step.

Large CPU allocations are served by ``mmap`` and page-fault on first touch: a ZO step that
allocated its noise, deltas and branch values afresh every time spent a visible share of its
time there. A workspace hands out the same buffers each step instead.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Workspace"]


class Workspace:
    def __init__(self) -> None:
        self._buffers: dict[Hashable, Tensor] = {}
        self._views: dict[Hashable, tuple[Tensor, list[Tensor]]] = {}

    def buffer(self, key: Hashable, shape: Sequence[int], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, reused per key."""
        shape = tuple(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf

    def like(self, key: Hashable, tensors: Sequence[Tensor]) -> list[Tensor]:
        """One buffer per tensor, shaped like it."""
        return [self.buffer((key, i), t.shape, t) for i, t in enumerate(tensors)]

    def flat_like(self, key: Hashable, tensors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One buffer holding all ``tensors`` end to end, and a view shaped like each of them."""
        flat = self.buffer(key, (sum(t.numel() for t in tensors),), tensors[0])
        cached = self._views.get(key)
        if cached is not None and cached[0] is flat and [v.shape for v in cached[1]] == [t.shape for t in tensors]:
            return flat, list(cached[1])  # the same buffer and shapes: the views of last time
        views, start = [], 0
        for t in tensors:
            views.append(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()
        self._views[key] = (flat, views)
        return flat, list(views)

    @staticmethod
    def get(workspace: Optional["Workspace"]) -> "Workspace":
        return workspace if workspace is not None else Workspace()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
