"""The quantization prologue of sequential branches: every perturbed weight quantized at once.

In the branch graph each lifted weight goes through its own ``fake_quant_kernel`` call: a
Python function and five aten ops per weight, per branch. ``QuantPrologue`` quantizes the
hoisted weights before the graph runs instead. Where numba is installed, each weight is
perturbed and quantized in one compiled pass (``numba_kernels.perturb_quantize_rows``); for a
first layer's weight the same pass lists the weights whose code moved, for the incremental
layers of :mod:`qzo_fx.train.base_reuse` and :mod:`qzo_fx.train.conv_reuse`. Otherwise, and for what the
kernel does not take, one ``torch._foreach_*`` call per operation (``ops.fake_quant_foreach_``).
Both follow the kernel's operations in its order: bit-identical values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.train.base_reuse import FirstLayerReuse
from qzo_fx.train.compiled import kernel
from qzo_fx.quant.ops import expand_param, fake_quant_foreach_
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["HoistedWeight", "QuantPrologue", "PROLOGUE"]

PROLOGUE = "qzo_prologue"  # submodule name in the sequential branch graph
THREADED_MIN = 1 << 15  # elements: a smaller weight is quantized on one thread
_NO_BASE = np.empty((0, 0), np.float32)  # the threaded kernel's "compare with nothing"
_NO_CHANGES = np.empty(0, np.int64)


@dataclass(frozen=True)
class HoistedWeight:
    """A lifted input quantized by the prologue rather than in the graph."""

    index: int          # position among the graph's lifted inputs
    quantizer: str      # the quantizer module (qzo_quant.<name>) whose scale and zero point apply
    qmin: int
    qmax: int
    axis: int
    first_layer: Optional[str] = None  # the key of the incremental first layer it feeds, if any


class QuantPrologue(nn.Module):
    def __init__(self, weights: Sequence[HoistedWeight], quantizers: Sequence[Quantizer],
                 first_layers: Optional[dict[str, FirstLayerReuse]] = None) -> None:
        super().__init__()
        self.weights = tuple(weights)
        # A list and a dict: not registered as children (they belong to the model and the
        # graph). The quantizers' scale and zero point are read at every call: they may be
        # learned or re-initialised.
        self._quantizers = list(quantizers)
        self._first_layers = dict(first_layers or {})  # key -> its incremental layer
        self._where: dict[int, Tensor] = {}  # per first-layer weight: room for its change list
        self._cache: dict[int, tuple] = {}   # per weight: its tensors, their memory, numpy views

    def perturb_and_quantize(self, values: list[Tensor], params: Sequence[Tensor], deltas: Sequence[Any],
                             sign: float) -> set[int]:
        """``values[i] = Q(params[i] + sign * eps * v)`` in one compiled pass for each hoisted
        weight of two or more dimensions whose delta is a ``(v, eps)`` pair with one eps and
        scale per output row (or one in all): the perturbation, five q/dq passes and their reads
        fused, with the values of ``perturbed`` followed by :meth:`forward`. For the weight of a
        first layer the same pass lists where the value differs from the base pass's
        ``Q(theta)`` and hands the list to the incremental layer, which then needs no scan of
        its own. Returns the indices written; the caller perturbs the rest and passes them to
        :meth:`forward` as ``skip``."""
        serial, threaded = kernel("perturb_quantize_rows"), kernel("perturb_quantize_changes")
        done: set[int] = set()
        if serial is None:
            return done
        sign32 = np.float32(sign)
        for quantizer, w in zip(self._quantizers, self.weights):
            out = values[w.index]
            rows = self._arrays(w, params[w.index], deltas[w.index], out, quantizer)
            if rows is None:
                continue
            bounds = (sign32, np.float32(w.qmin), np.float32(w.qmax))
            base = self._base_weight(w, out)
            if base is not None:
                where = self._where_buffer(w, out)
                count = threaded(*rows, *bounds, base.reshape(rows[0].shape).numpy(), where.numpy())
                # More changes than the list has room for: the layer's dense product wins anyway.
                self._first_layers[w.first_layer].record_changes(
                    w.first_layer, out, where[:count] if count <= len(where) else None)
            elif out.numel() >= THREADED_MIN:
                threaded(*rows, *bounds, _NO_BASE, _NO_CHANGES)
            else:
                serial(*rows, *bounds)
            done.add(w.index)
        return done

    def _arrays(self, w: HoistedWeight, theta: Tensor, delta: Any, out: Tensor, quantizer: Quantizer):
        """:func:`_row_arrays`, kept while the same tensors hold the same memory: building numpy
        views costs ~30 us a weight, more than the kernel on a small one."""
        tensors = (theta, *(delta if isinstance(delta, tuple) else (delta,)), out, quantizer.scale,
                   quantizer.zero_point)
        layout = tuple((t.data_ptr(), t.shape) for t in tensors)
        cached = self._cache.get(w.index)
        if cached is None or cached[1] != layout or any(a is not b for a, b in zip(cached[0], tensors)):
            cached = self._cache[w.index] = (tensors, layout, _row_arrays(theta, delta, out, quantizer, w))
        return cached[2]

    def _base_weight(self, w: HoistedWeight, out: Tensor) -> Optional[Tensor]:
        """The base pass's ``Q(theta)`` of a first layer's weight this step, where comparable."""
        layer = self._first_layers.get(w.first_layer)
        if layer is None:
            return None
        base = layer.base_weight(w.first_layer)
        usable = (base is not None and base.shape == out.shape and base.dtype == out.dtype
                  and base.device == out.device and base.is_contiguous())
        return base if usable else None

    def _where_buffer(self, w: HoistedWeight, out: Tensor) -> Tensor:
        room, buffer = self._first_layers[w.first_layer].room(out.numel()), self._where.get(w.index)
        if buffer is None or len(buffer) != room:
            buffer = self._where[w.index] = torch.empty(room, dtype=torch.int64)
        return buffer

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
    :func:`~qzo_fx.train.numba_kernels.perturb_quantize_rows`, or None where it does not apply (1-D,
    not float32 CPU contiguous, an integer step, a scale along another axis)."""
    if not isinstance(delta, tuple) or theta.dim() < 2:
        return None
    v, eps = delta
    rows = theta.shape[0]
    dense = (theta, v, out)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != theta.shape
           for t in dense):
        return None
    per_row = [eps.detach(), quantizer.scale.detach(), quantizer.zero_point.detach()]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.numel() not in (1, rows) or not t.is_contiguous()
           for t in per_row):
        return None
    along_rows = eps.numel() == 1 or eps.shape[0] == rows  # not a per-column eps of the same length
    if not along_rows or (w.axis != 0 and quantizer.scale.numel() > 1):
        return None
    flat = [t.detach().reshape(rows, -1).numpy() for t in (out, theta, v)]
    return (*flat, *(t.reshape(-1).numpy() for t in per_row))  # views: they follow in-place updates
