"""Every batch must look like the first: a wrong batch fails before any parameter or buffer changes."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor
from torch.utils._pytree import tree_leaves

from qzo_fx.errors import BatchError

__all__ = ["BatchSignature"]


class BatchSignature:
    """The structure, dtypes and trailing shapes of the first batch (integer tensors -- tokens,
    labels -- may vary in length; float inputs keep their trailing shape)."""

    def __init__(self) -> None:
        self.signature: Optional[list[tuple]] = None

    def check(self, batch: Any, step_index: int) -> None:
        signature = [(i, t.dtype, tuple(t.shape[1:]) if t.is_floating_point() else ("ndim", t.dim()))
                     for i, t in enumerate(tree_leaves(batch)) if isinstance(t, Tensor)]
        if self.signature is None:
            self.signature = signature
            return
        if signature != self.signature:
            expected = ", ".join(f"#{i} {d} {s}" for i, d, s in self.signature)
            got = ", ".join(f"#{i} {d} {s}" for i, d, s in signature)
            raise BatchError(f"step {step_index}: batch tensors do not match the first batch "
                             f"(expected {expected}; got {got}). Nothing was changed; fix the data pipeline.")
