"""One finiteness check per step: every loss, gradient and estimate the step produced.

The estimators register device tensors as they go (a loss, the per-tensor largest magnitude of
the STE gradients or of the estimate: finite exactly when every entry is); the step reads them
all in one host transfer at its end and raises or skips naming what was not finite, before any
optimizer sees the gradients. With ``on_nonfinite="unchecked"`` nothing is registered and the
step never waits for the device. On a sharded model each rank holds parts of the gradients: the
peaks of the parts are summed over the ranks (in float64, one all-reduce at the end), so that every
rank finds the same failures and raises or skips alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["FiniteCheck"]


@dataclass(frozen=True)
class _Item:
    what: str                      # e.g. "base loss", "STE gradient", "estimate"
    values: Tensor                 # flat, on any device
    names: Optional[tuple[str, ...]]  # one per value (parameter names), or None
    partial: bool = False          # peaks of this rank's shards, summed over ranks when read


class FiniteCheck:
    """Collects the values of one step to be checked together."""

    def __init__(self, enabled: bool = True, sum_over_ranks: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.enabled, self._sum = enabled, sum_over_ranks
        self._items: list[_Item] = []
        self._watched: dict[str, Tensor] = {}
        self.watched: dict[str, list[float]] = {}  # values read along for the statistics

    def add(self, what: str, values: Tensor, names: Optional[Sequence[str]] = None) -> None:
        if self.enabled:
            self._items.append(_Item(what, values.detach().reshape(-1), None if names is None else tuple(names)))

    def watch(self, name: str, values: Tensor) -> None:
        """Read ``values`` along with the check (statistics: branch losses, zero guides)."""
        if self.enabled:
            self._watched[name] = values.detach().reshape(-1)

    def add_norms(self, what: str, tensors: Sequence[Tensor], names: Sequence[str]) -> None:
        """Register the largest magnitude of each of ``tensors`` (one foreach reduction): finite
        iff every entry is. Not the 2-norm: its float32 sum of squares overflows at entries of
        about 1e19, a finite gradient that a random-init network can reach on a small batch."""
        if self.enabled and tensors:
            peaks = torch.stack([n.float() for n in torch._foreach_norm(list(tensors), math.inf)])
            if self._sum is None:
                self.add(what, peaks, names)
            else:  # summed over ranks in float64: finite iff every rank's is
                self._items.append(_Item(what, peaks.double(), tuple(names), partial=True))

    def failures(self) -> list[str]:
        """What was not finite, named (one host transfer for everything registered)."""
        watched = list(self._watched.items())
        parts = [item.values for item in self._items] + [values for _, values in watched]
        if not parts:
            return []
        partial = [i for i, item in enumerate(self._items) if item.partial]
        if partial:  # the shards' peaks, summed over ranks in one all-reduce
            summed = self._sum(torch.cat([parts[i] for i in partial])).split([parts[i].numel() for i in partial])
            for i, values in zip(partial, summed):
                parts[i] = values
        flat = torch.cat([t.double().to(parts[0].device) for t in parts]).tolist()  # a float64 norm may pass 3e38
        found, at = [], 0
        for item in self._items:
            chunk, at = flat[at:at + item.values.numel()], at + item.values.numel()
            bad = [i for i, value in enumerate(chunk) if not math.isfinite(value)]
            if not bad:
                continue
            if item.names is None:
                found.append(f"{item.what} {chunk}")
            else:
                found.append(f"{item.what} of {', '.join(item.names[i] for i in bad)}")
        for name, values in watched:
            self.watched[name], at = flat[at:at + values.numel()], at + values.numel()
        return found
