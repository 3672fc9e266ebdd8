"""The weight prologue of sequential branches: each hoisted weight perturbed and quantized before
the branch graph runs (``passes/train/hoist_weight_qdq.py`` takes their q/dq out of the graph).

Per weight, ``Q(theta + sign * eps * v)`` is written into the branch's value buffer: with the
optional compiled backend in one pass (``perturb_quantize``: the fused multiply-add and the
kernel's five operations in their order, bit-identical), else as ``addcmul`` into the buffer and
the q/dq operations in place on it (no new tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.quant.ops import expand_param
from qzo_fx.quant.quantizer import Quantizer
from qzo_fx.train import compiled

__all__ = ["HoistedWeight", "QuantPrologue", "PROLOGUE"]

PROLOGUE = "qzo_prologue"  # submodule name in the sequential branch graph
THREADED_MIN = 1 << 15     # elements: a smaller weight is quantized on one thread


@dataclass(frozen=True)
class HoistedWeight:
    """A lifted weight quantized by the prologue rather than in the graph."""

    index: int       # position among the graph's lifted inputs
    quantizer: str   # qzo_quant.<name>: whose scale and zero point apply (read at every call)
    qmin: int
    qmax: int
    axis: int


class QuantPrologue(nn.Module):
    def __init__(self, weights: Sequence[HoistedWeight], quantizers: Sequence[Quantizer]) -> None:
        super().__init__()
        self.weights = {w.index: w for w in weights}
        self._quantizers = {w.index: q for w, q in zip(weights, quantizers)}  # a dict: not registered as children

    def perturb_quantize(self, index: int, out: Tensor, theta: Tensor, v: Tensor, eps: Optional[Tensor],
                         sign: float) -> bool:
        """``out = Q(theta + sign * eps * v)`` for hoisted input ``index``; False if it is not hoisted."""
        w = self.weights.get(index)
        if w is None:
            return False
        quantizer = self._quantizers[index]
        fused = compiled.kernel("perturb_quantize_threaded" if out.numel() >= THREADED_MIN else "perturb_quantize")
        arrays = _row_arrays(theta, v, eps, out, quantizer, w) if eps is not None and fused is not None else None
        if arrays is not None:
            fused(*arrays, np.float32(sign), np.float32(w.qmin), np.float32(w.qmax))
            return True
        if eps is None:
            torch.add(theta, v, alpha=sign, out=out)
        else:
            torch.addcmul(theta, v, eps, value=sign, out=out)
        s = expand_param(quantizer.scale.detach(), out, w.axis, 0)
        out.div_(s).round_()
        if w.qmin < 0:  # signed grids are symmetric: no zero point (fake_quant_kernel's order)
            out.clamp_min_(w.qmin).clamp_max_(w.qmax)
        else:
            z = expand_param(quantizer.zero_point, out, w.axis, 0)
            out.add_(z).clamp_min_(w.qmin).clamp_max_(w.qmax).sub_(z)
        out.mul_(s)
        return True

    def extra_repr(self) -> str:
        return ", ".join(w.quantizer for w in self.weights.values())


def _row_arrays(theta: Tensor, v: Tensor, eps: Tensor, out: Tensor, quantizer: Quantizer, w: HoistedWeight):
    """numpy views ``(out, theta, v, eps, scale, zero)`` as [rows, cols] and per-row vectors for the
    compiled kernel, or None where it does not apply (1-D, not float32 CPU contiguous, a scale
    along another axis)."""
    if theta.dim() < 2:
        return None
    rows = theta.shape[0]
    per_row = (eps.detach(), quantizer.scale.detach(), quantizer.zero_point.detach())
    dense = (theta, v, out)
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in (*dense, *per_row))
            or any(t.shape != theta.shape for t in dense) or any(t.numel() not in (1, rows) for t in per_row)):
        return None
    if (eps.numel() > 1 and eps.shape[0] != rows) or (w.axis != 0 and quantizer.scale.numel() > 1):
        return None
    flat = [t.detach().reshape(rows, -1).numpy() for t in (out, theta, v)]
    return (*flat, *(t.reshape(-1).numpy() for t in per_row))
