"""Branches that reuse the base pass: a first layer computed from its change only.

A *first layer* is a linear layer whose input does not depend on any perturbed parameter (e.g.
the input layer of an MLP). Every branch sees the same input ``x`` as the base STE pass, and its
perturbed quantized weight differs from the base one only where the perturbation crossed a
rounding boundary -- about 0.1-1% of the entries with FOGZO's small noise. So

    linear(x, Q(theta + delta), b) = base_out + x @ (Q(theta + delta) - Q(theta))^T

costs a scan of the weight and one multiply-add per changed entry and batch row, instead of a
dense GEMM. Few changes: a gather of the touched input columns; more: a CSR sparse product
(column gathers are strided and cost ~4x more per entry than CSR's row-major reads).
``BaseTaps`` (in the base graph) keeps ``x``, ``Q(theta)`` and the output of each first layer
for the current step; ``IncrementalLinear`` (in the sequential branch graph) uses them, and
computes the dense product whenever the input differs from the base pass's, the step's base
pass has not run, the change is not sparse, or the layer is too small to gain. The list of
changed weights usually comes from the prologue's compiled q/dq (``record_changes``); a scan
finds it otherwise. First convolutions: :mod:`qzo_fx.train.conv_reuse`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qzo_fx.train.compiled import kernel

__all__ = ["BaseTaps", "FirstLayerReuse", "IncrementalLinear", "TAPS", "INCREMENTAL", "MAX_DENSITY", "MIN_MACS",
           "changed_entries"]

TAPS = "qzo_base_taps"            # submodule name in the base graph
INCREMENTAL = "qzo_incremental"   # submodule name in the sequential branch graph
MAX_DENSITY = 0.02                # above this fraction of changed weights the dense GEMM wins
MIN_MACS = 2_000_000              # smaller layers: the scan costs more than the GEMM it saves
GATHER_MAX = 256                  # up to this many changed entries a column gather beats CSR


@dataclass
class _Base:
    x: Tensor                          # the layer's input in the base pass (as given, not copied)
    x_version: int                     # its version counter: an in-place change voids the reuse
    weight: Tensor                     # Q(theta)
    out: Tensor                        # the base output (a copy, or as it is with its version)
    out_version: int = 0               # its version when kept: a later in-place write voids it


class BaseTaps(nn.Module):
    """Identity on a first layer's output that records what branches reuse, per step."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, _Base] = {}

    def clear(self) -> None:
        self.values.clear()

    def forward(self, key: str, x: Tensor, weight: Tensor, out: Tensor, copy: bool = True) -> Tensor:
        """Keep this step's values of layer ``key``; the output as a copy (a linear layer's
        output is often activated in place next) or as it is (a convolution's chain ends after
        its activations; a later in-place write shows in the version kept with it)."""
        kept = out.detach().clone() if copy else out.detach()
        self.values[key] = _Base(x.detach(), x._version, weight.detach(), kept, kept._version)
        return out


class FirstLayerReuse(nn.Module):
    """What the incremental first layers share: the taps of the base pass, and the lists of
    changed weights the prologue hands over."""

    def __init__(self, taps: BaseTaps) -> None:
        super().__init__()
        self.taps = [taps]  # a list: not registered as a child (it belongs to the base graph)
        self.calls = self.incremental_calls = 0
        self._recorded: dict[str, tuple[Tensor, int, Optional[Tensor]]] = {}

    def base_weight(self, key: str) -> Optional[Tensor]:
        """The base pass's ``Q(theta)`` of layer ``key`` in this step (None before its base pass)."""
        base = self.taps[0].values.get(key)
        return None if base is None else base.weight

    def record_changes(self, key: str, weight: Tensor, where: Optional[Tensor]) -> None:
        """``weight`` (just written, the next input of layer ``key``) differs from the base
        weight at flat indices ``where`` (None: at more than :meth:`room` allows). Valid
        until ``weight`` is written again by torch or another record replaces it."""
        self._recorded[key] = (weight, weight._version, where)

    def room(self, numel: int) -> int:
        """The most changed entries of a weight of ``numel`` entries this layer uses a list of
        (for a linear layer: beyond ``MAX_DENSITY`` the dense product wins)."""
        return int(MAX_DENSITY * numel)

    def _reusable(self, key: str, x: Tensor, weight: Tensor) -> Optional["_Base"]:
        """This step's base values of layer ``key`` where a branch may build on them: tapped,
        a weight of the same shape, the kept output unchanged since, and the same input."""
        base = self.taps[0].values.get(key)
        if base is None or weight.shape != base.weight.shape or base.out._version != base.out_version:
            return None
        return base if _same_input(x, base) else None

    def _changes(self, key: str, weight: Tensor, base: "_Base") -> Optional[Tensor]:
        """Flat indices where ``weight`` differs from the base weight (None: more than
        :meth:`room`): the prologue's list where it handed one over for this very tensor, else
        a scan."""
        recorded = self._recorded.get(key)
        if recorded is not None and recorded[0] is weight and recorded[1] == weight._version:
            return recorded[2]
        where = changed_entries(weight.reshape(-1), base.weight.reshape(-1))
        return where if where.numel() <= self.room(weight.numel()) else None


class IncrementalLinear(FirstLayerReuse):
    """``linear(x, weight, bias)`` from the base pass's output and the weight's change."""

    def forward(self, key: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        self.calls += 1
        if weight.dim() != 2 or weight.numel() * (x.numel() // weight.shape[1]) < MIN_MACS:
            return F.linear(x, weight, bias)
        base = self._reusable(key, x, weight)
        if base is None:
            return F.linear(x, weight, bias)
        out_features, in_features = weight.shape
        rows = x.numel() // in_features
        where = self._changes(key, weight, base)
        if where is None:
            return F.linear(x, weight, bias)
        self.incremental_calls += 1
        x2, out = x.reshape(rows, in_features), base.out.reshape(rows, out_features)
        few = where.numel() <= GATHER_MAX
        product = kernel("add_weight_changes") if few else None
        if product is not None and _compiled_operands(x2, out, weight, base.weight):
            result = torch.empty_like(out)
            product(result.numpy(), out.numpy(), x2.numpy(), weight.numpy(), base.weight.numpy(), where.numpy())
            return result.view(base.out.shape)
        out_row = torch.div(where, in_features, rounding_mode="floor")
        column = where - out_row * in_features
        change = weight.reshape(-1).index_select(0, where) - base.weight.reshape(-1).index_select(0, where)
        if few:
            # out[r, o] += x[r, i] * change[o, i]: the touched input columns, scaled, added in.
            return out.index_add(1, out_row, x2.index_select(1, column).mul_(change)).view(base.out.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CSR's "beta" notice: the product is long supported
            sparse = torch.sparse_csr_tensor(torch._convert_indices_from_coo_to_csr(out_row, out_features),
                                             column, change, (out_features, in_features), check_invariants=False)
        return torch.addmm(out, x2, sparse.t()).view(base.out.shape)


def changed_entries(new: Tensor, old: Tensor) -> Tensor:
    """Flat indices where ``new != old``, ascending. On CPU numpy's compare and flatnonzero
    take ~40 us on 200k floats, torch's ne + nonzero ~130 us."""
    if (new.device.type == "cpu" and new.dtype in (torch.float32, torch.float64) and new.dtype == old.dtype
            and new.is_contiguous() and old.is_contiguous()):
        return torch.from_numpy(np.flatnonzero(new.detach().numpy() != old.detach().numpy()))
    return torch.ne(new, old).nonzero().squeeze(1)


def _compiled_operands(*tensors: Tensor) -> bool:
    """True if the compiled product applies: float32, CPU, contiguous, no autograd."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
               for t in tensors)


def _same_input(x: Tensor, base: _Base) -> bool:
    """True if ``x`` holds the base pass's input: the same memory, unchanged, or equal values."""
    if x.shape != base.x.shape or x.dtype != base.x.dtype:
        return False
    if (x.data_ptr() == base.x.data_ptr() and x.stride() == base.x.stride()
            and base.x._version == base.x_version):
        return True
    return torch.equal(x, base.x)
