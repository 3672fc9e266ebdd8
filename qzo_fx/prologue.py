"""The quantization prologue of sequential branches: every perturbed weight quantized at once.

In the branch graph each lifted weight goes through its own ``fake_quant_kernel`` call: a
Python function and five aten ops per weight, per branch. ``QuantPrologue`` quantizes all
hoisted weights with one ``torch._foreach_*`` call per operation instead, before the graph
runs (``ops.fake_quant_foreach_``: the kernel's operations in its order, bit-identical values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.compiled import kernel
from qzo_fx.ops import expand_param, fake_quant_foreach_
from qzo_fx.quantizer import Quantizer

__all__ = ["HoistedWeight", "QuantPrologue", "PROLOGUE"]

PROLOGUE = "qzo_prologue"  # submodule name in the sequential branch graph
FUSE_MIN = 1 << 14  # elements: below, the foreach path's one call for all weights is as fast


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

    def perturb_and_quantize(self, values: list[Tensor], params: Sequence[Tensor], deltas: Sequence[Any],
                             sign: float) -> set[int]:
        """``values[i] = Q(params[i] + sign * eps * v)`` in one compiled pass for each large hoisted
        weight whose delta is a ``(v, eps)`` pair with one eps and scale per output row (or one
        in all): the perturbation, five q/dq passes and their reads fused, with the values of
        ``perturbed`` followed by :meth:`forward`. Returns the indices written; the caller
        perturbs the rest and passes them to :meth:`forward` as ``skip``."""
        fused = kernel("perturb_quantize_rows")
        done: set[int] = set()
        if fused is None:
            return done
        for quantizer, w in zip(self._quantizers, self.weights):
            rows = _row_arrays(params[w.index], deltas[w.index], values[w.index], quantizer, w)
            if rows is not None:
                fused(*rows, np.float32(sign), np.float32(w.qmin), np.float32(w.qmax))
                done.add(w.index)
        return done

    def forward(self, values: list[Tensor], skip: Collection[int] = ()) -> None:
        """Quantize ``values[w.index]`` in place for every hoisted weight ``w`` not in ``skip``."""
        weights = [w for w in self.weights if w.index not in skip]
        if not weights:
            return
        quantizers = [q for q, w in zip(self._quantizers, self.weights) if w.index not in skip]
        xs = [values[w.index] for w in weights]
        pairs = list(zip(quantizers, xs, weights))
        fake_quant_foreach_(xs, [expand_param(q.scale.detach(), x, w.axis, 0) for q, x, w in pairs],
                            [expand_param(q.zero_point, x, w.axis, 0) for q, x, w in pairs],
                            [w.qmin for w in weights], [w.qmax for w in weights])

    def extra_repr(self) -> str:
        return ", ".join(w.quantizer for w in self.weights)


def _row_arrays(theta: Tensor, delta: Any, out: Tensor, quantizer: Quantizer, w: HoistedWeight):
    """numpy views ``(out, theta, v, eps, scale, zero)`` as [rows, cols] and per-row vectors for
    :func:`~qzo_fx.numba_kernels.perturb_quantize_rows`, or None where it does not apply (small,
    not float32 CPU contiguous, an integer step, a scale along another axis)."""
    if not isinstance(delta, tuple) or theta.numel() < FUSE_MIN or theta.dim() < 2:
        return None
    v, eps = delta
    rows = theta.shape[0]
    dense = (theta, v, out)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != theta.shape
           for t in dense):
        return None
    per_row = [eps.detach(), quantizer.scale.detach(), quantizer.zero_point.detach()]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.numel() not in (1, rows) for t in per_row):
        return None
    along_rows = eps.numel() == 1 or eps.shape[0] == rows  # not a per-column eps of the same length
    if not along_rows or (w.axis != 0 and quantizer.scale.numel() > 1):
        return None
    flat = [t.detach().reshape(rows, -1).numpy() for t in (out, theta, v)]
    return (*flat, *(t.reshape(-1).contiguous().numpy() for t in per_row))
