"""The random state a branch replays: the CPU generator and, once CUDA is in use, every CUDA one.

A branch must see the base pass's dropout masks. On a GPU those come from the CUDA generator,
so replaying the CPU state alone would give every branch fresh masks (and a biased estimate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RngState"]


@dataclass(frozen=True)
class RngState:
    cpu: Tensor
    cuda: tuple[Tensor, ...] = ()  # one per device, in device order; empty before CUDA is used

    @classmethod
    def capture(cls) -> "RngState":
        # is_initialized: a CPU-only run never pays for (or triggers) CUDA initialisation.
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)
