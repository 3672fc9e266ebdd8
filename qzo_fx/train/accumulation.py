"""Gradient accumulation across steps: ``step(batch)`` adds to ``.grad`` as ``backward()`` does.

The step writes its estimate into ``.grad`` and FOGZO reads its guide from there, so both must
be the batch's own: what earlier calls left (the micro-batches of an accumulation loop) is set
aside before the step and summed in after it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["set_aside_gradients", "add_back"]


def set_aside_gradients(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, .grad)`` of every parameter that has one, each ``.grad`` taken off."""
    kept: list[tuple[Tensor, Tensor]] = [(p, p.grad) for p in model.parameters() if p.grad is not None]
    for p, _ in kept:
        p.grad = None
    return kept


def add_back(earlier: list[tuple[Tensor, Tensor]]) -> None:
    """``.grad`` <- what earlier calls left + this step's gradient (where it has one)."""
    with torch.no_grad():
        for p, grad in earlier:
            if p.grad is not None:
                grad.add_(p.grad)
            p.grad = grad
