"""The quantization prologue of sequential branches: every perturbed weight quantized at once.

In the branch graph each lifted weight goes through its own ``fake_quant_kernel`` call: a
Python function and five aten ops per weight, per branch. ``QuantPrologue`` quantizes all
hoisted weights with one ``torch._foreach_*`` call per operation instead, before the graph
runs. Its operations are the kernel's, in the kernel's order (divide, round half to even,
zero point, clamp, scale), so the values are bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.ops import expand_param

__all__ = ["HoistedWeight", "QuantPrologue", "PROLOGUE"]

PROLOGUE = "qzo_prologue"  # submodule name in the sequential branch graph


@dataclass(frozen=True)
class HoistedWeight:
    """A lifted input quantized by the prologue rather than in the graph."""

    index: int          # position among the graph's lifted inputs
    quantizer: str      # the quantizer module (qzo_quant.<name>) whose scale and zero point apply
    qmin: int
    qmax: int
    axis: int


class QuantPrologue(nn.Module):
    def __init__(self, root: nn.Module, weights: Sequence[HoistedWeight]) -> None:
        super().__init__()
        self.weights = tuple(weights)
        # Quantizer modules, resolved once (a list: not registered as children). Their scale
        # and zero point are read at every call: they may be learned or re-initialised.
        self._quantizers = [root.get_submodule(w.quantizer) for w in self.weights]

    def forward(self, values: list[Tensor]) -> None:
        """Quantize ``values[w.index]`` in place for every hoisted weight ``w``."""
        xs = [values[w.index] for w in self.weights]
        scales = [expand_param(q.scale.detach(), x, w.axis, 0) for q, x, w in zip(self._quantizers, xs, self.weights)]
        unsigned = [(x, expand_param(q.zero_point, x, w.axis, 0))
                    for q, x, w in zip(self._quantizers, xs, self.weights) if w.qmin >= 0]
        torch._foreach_div_(xs, scales)
        torch._foreach_round_(xs)
        if unsigned:  # signed grids are symmetric (zero point 0): the kernel skips these passes too
            torch._foreach_add_([x for x, _ in unsigned], [z for _, z in unsigned])
        torch._foreach_clamp_min_(xs, [w.qmin for w in self.weights])
        torch._foreach_clamp_max_(xs, [w.qmax for w in self.weights])
        if unsigned:
            torch._foreach_sub_([x for x, _ in unsigned], [z for _, z in unsigned])
        torch._foreach_mul_(xs, scales)

    def extra_repr(self) -> str:
        return ", ".join(w.quantizer for w in self.weights)
