"""Every batch must look like the first: a wrong batch fails before any parameter or buffer changes.

The structure, dtypes and ranks of a batch's tensors are fixed by the first batch. Their shapes
may vary (the last batch of an epoch, multi-scale images, audio padded to each batch's longest
clip); a batch of another shape that the model then fails on is reported as a :class:`BatchError`
with the buffers it touched (BatchNorm statistics) restored.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_leaves

from qzo_fx.errors import BatchError, QzoError

__all__ = ["BatchSignature"]


def _tensors(batch: Any) -> list[tuple[int, Tensor]]:
    return [(i, t) for i, t in enumerate(tree_leaves(batch)) if isinstance(t, Tensor)]


class BatchSignature:
    """The structure, dtypes and ranks of the first batch, and its shapes."""

    def __init__(self) -> None:
        self.signature: Optional[list[tuple]] = None
        self.shapes: Optional[list[tuple[int, ...]]] = None

    def check(self, batch: Any, step_index: int) -> None:
        tensors = _tensors(batch)
        signature = [(i, t.dtype, ("ndim", t.dim())) for i, t in tensors]
        if self.signature is None:
            self.signature, self.shapes = signature, [tuple(t.shape) for _, t in tensors]
            return
        if signature != self.signature:
            expected = ", ".join(f"#{i} {d} {s}" for i, d, s in self.signature)
            got = ", ".join(f"#{i} {d} {s}" for i, d, s in signature)
            raise BatchError(f"step {step_index}: batch tensors do not match the first batch "
                             f"(expected {expected}; got {got}). Nothing was changed; fix the data pipeline.")

    @contextlib.contextmanager
    def guarded(self, batch: Any, model: nn.Module, step_index: int) -> Iterator[None]:
        """Run a step on ``batch``; where its shapes are not the first batch's and the step fails
        (the model takes no such shape), restore the model's buffers and raise a BatchError."""
        shapes = [tuple(t.shape) for _, t in _tensors(batch)]
        if self.shapes is None or shapes == self.shapes:
            yield
            return
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            yield
        except Exception as error:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
            if isinstance(error, QzoError):
                raise
            raise BatchError(f"step {step_index}: the model failed on a batch of shapes {shapes}, where the first "
                             f"batch had {self.shapes}: {type(error).__name__}: {error}. Nothing was changed; "
                             "fix the data pipeline.") from error
