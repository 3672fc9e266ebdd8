"""The quantization prologue of sequential branches: every perturbed weight quantized at once.

In the branch graph each lifted weight goes through its own ``fake_quant_kernel`` call: a
Python function and five aten ops per weight, per branch. ``QuantPrologue`` quantizes all
hoisted weights with one ``torch._foreach_*`` call per operation instead, before the graph
runs (``ops.fake_quant_foreach_``: the kernel's operations in its order, bit-identical values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn
from torch import Tensor

from qzo_fx.ops import expand_param, fake_quant_foreach_
from qzo_fx.quantizer import Quantizer

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
    def __init__(self, weights: Sequence[HoistedWeight], quantizers: Sequence[Quantizer]) -> None:
        super().__init__()
        self.weights = tuple(weights)
        # A list, not registered as children (they belong to the model). Their scale and zero
        # point are read at every call: they may be learned or re-initialised.
        self._quantizers = list(quantizers)

    def forward(self, values: list[Tensor]) -> None:
        """Quantize ``values[w.index]`` in place for every hoisted weight ``w``."""
        xs = [values[w.index] for w in self.weights]
        pairs = list(zip(self._quantizers, xs, self.weights))
        fake_quant_foreach_(xs, [expand_param(q.scale.detach(), x, w.axis, 0) for q, x, w in pairs],
                            [expand_param(q.zero_point, x, w.axis, 0) for q, x, w in pairs],
                            [w.qmin for w in self.weights], [w.qmax for w in self.weights])

    def extra_repr(self) -> str:
        return ", ".join(w.quantizer for w in self.weights)
