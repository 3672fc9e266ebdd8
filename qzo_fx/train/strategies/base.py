"""What every branch strategy shares: the branches to evaluate, the branch semantics, the interface.

A *branch* is the loss at ``theta + sign * delta`` for the perturbed tensors, on the step's
batch. Branch semantics (docs/algorithms.md) hold for every strategy: the base pass's random
state before every branch (identical dropout masks), BatchNorm in training mode with batch
statistics and frozen running statistics, every other buffer restored, no autograd.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.train.rng import RngState
from qzo_fx.train.workspace import Workspace

__all__ = ["Branches", "BranchModel", "Strategy", "StrategyContext", "apply_delta"]

LossFn = Callable[[Any, Any], Tensor]
Tensors = list[Tensor]


@dataclass
class Branches:
    """K branches: branch ``b`` evaluates the loss at ``theta + sign_b * eps * v_{k_b}``.

    ``tensor(k, i)`` computes direction k on tensor i alone (what the lean strategy streams);
    :meth:`directions` materializes them all once (the other strategies). ``eps=None``: the
    directions are integer steps added as they are (ZOQO's codes).
    """

    pattern: list[tuple[int, float]]
    tensor: Callable[[int, int], Tensor]
    eps: Optional[Tensors]
    materialize: Callable[[], list[Tensors]]
    _materialized: Optional[list[Tensors]] = field(default=None, repr=False)

    def directions(self) -> list[Tensors]:
        if self._materialized is None:
            self._materialized = self.materialize()
        return self._materialized

    @property
    def materialized(self) -> Optional[list[Tensors]]:
        """The directions if a strategy materialized them (the estimate reuses them), else None."""
        return self._materialized

    def delta(self, k: int, i: int, direction: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        v = self.directions()[k][i] if direction is None else direction
        return v, None if self.eps is None else self.eps[i]


def apply_delta(theta: Tensor, v: Tensor, eps: Optional[Tensor], sign: float, out: Optional[Tensor] = None) -> Tensor:
    """``theta + sign * eps * v`` as one fused multiply-add (``eps=None``: ``theta + sign * v``),
    into ``out``, or in place into ``theta`` when ``out`` is None."""
    if eps is not None:
        return theta.addcmul_(v, eps, value=sign) if out is None else torch.addcmul(theta, v, eps, value=sign, out=out)
    alpha = sign if theta.is_floating_point() else int(sign)  # integer codes take an int
    return theta.add_(v, alpha=alpha) if out is None else torch.add(theta, v, alpha=alpha, out=out)


class BranchModel:
    """What ``loss_fn`` receives in a branch: calls a branch graph with bound leading inputs and
    resolves attributes on the model."""

    def __init__(self, graph: Callable, model: nn.Module, values: Sequence[Tensor]) -> None:
        self._graph, self._model, self._values = graph, model, values

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._graph(*self._values, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class StrategyContext:
    """The model, loss and perturbed tensors the strategies of one step share, and the branch mode."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, names: Sequence[str], workspace: Workspace,
                 max_chunk: int = 64, tensors: Optional[Sequence[Tensor]] = None,
                 after_branch: Optional[Callable[[], None]] = None,
                 compiled: Optional[Callable[[Callable], Callable]] = None) -> None:
        self.model, self.loss_fn, self.names = model, loss_fn, tuple(names)
        # Parameters, or integer-code buffers (ZOQO): any tensor attribute, by dotted name; or the
        # tensors given (a sharded model's local shards, perturbed in place).
        self.params = list(tensors) if tensors is not None else [operator.attrgetter(n)(model) for n in self.names]
        self._after_branch = after_branch  # e.g. reshard an FSDP model after each branch's forward
        # What a strategy calls to run the model or a branch graph: torch.compile'd with compile=True.
        self.compiled: Callable[[Callable], Callable] = compiled if compiled is not None else (lambda fn: fn)
        self.compiling = compiled is not None
        self.workspace, self.max_chunk = workspace, max_chunk
        norms = {name: m for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
        self._norms = list(norms.values())
        # Saved and restored around the branches: every buffer but the quantizers' and those of
        # BatchNorm modules (frozen below, they write nothing; a norm decomposed into functional
        # ops, as torch.export leaves it, has its statistics dropped by freeze_norm_stats).
        frozen = tuple(name + "." for name in norms)
        self._buffers = [b for name, b in model.named_buffers()
                         if not name.startswith(QUANT_CONTAINER + ".") and not name.startswith(frozen)]

    @contextlib.contextmanager
    def branch_mode(self) -> Iterator[None]:
        """no_grad, frozen BatchNorm statistics, buffers and the outer random state restored."""
        saved = [b.clone() for b in self._buffers]
        outer_rng = RngState.capture()
        # With track_running_stats off, a BatchNorm in training mode uses batch statistics and
        # leaves its running statistics alone: the branch semantics. In eval mode it must keep
        # using the running ones, so it is left as it is.
        frozen = [m for m in self._norms if m.training]
        try:
            for m in frozen:
                m.track_running_stats = False
            with torch.no_grad():
                yield
        finally:
            for m in frozen:
                m.track_running_stats = True
            with torch.no_grad():
                for b, s in zip(self._buffers, saved):
                    b.copy_(s)
            outer_rng.restore()

    def loss(self, model: Any, batch: Any, rng_state: RngState) -> Tensor:
        """One branch's loss with the base pass's random state replayed."""
        rng_state.restore()
        try:
            return self.loss_fn(model, batch).detach().reshape(())
        finally:  # also when the branch raises: no stale gathered parameters for the next forward
            if self._after_branch is not None:
                self._after_branch()


class Strategy:
    """One way of evaluating branches. Subclasses set ``name`` and implement :meth:`losses`."""

    name = ""

    def __init__(self, ctx: StrategyContext) -> None:
        self.ctx = ctx

    def losses(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        """The loss of every branch of ``branches.pattern``, shape [K], inside the branch mode."""
        with self.ctx.branch_mode():
            return self.run(branches, batch, rng_state)

    def run(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        raise NotImplementedError

    @property
    def chosen(self) -> str:
        """The strategy that runs (``auto`` reports the candidate it settled on)."""
        return self.name
