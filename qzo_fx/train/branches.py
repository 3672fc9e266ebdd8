"""Perturbation branches: evaluate the loss at ``theta + sign * delta`` for K branches.

Strategies (all give the same losses to float tolerance; see tests/test_train.py):

* ``inplace``    -- write theta + delta into the parameters, run the model, restore theta
                    exactly from a copy (MeZO-style; the cheapest for K = 2 on CPU).
* ``sequential`` -- run the branch graph once per branch with out-of-place values (weights
                    perturbed and quantized by a prologue, first layers reused).
* ``batched``    -- run the branch graph under ``torch.func.vmap`` with every lifted parameter
                    stacked on a leading branch axis (K branches in one pass, chunked).
* ``lean``       -- the model's graph with every perturbed read streamed through a perturber
                    that regenerates the direction tensor by tensor: extra memory about the
                    largest tensor (noise is drawn again per branch and for the estimate).
* ``auto``       -- run the candidates in turn on the first steps, timing each, then keep
                    the one with the smallest median time.

Branch semantics: same batch, same randomness as the base pass (the RNG state is reset before
every branch, vmap uses ``randomness="same"``), BatchNorm uses batch statistics but never
updates its running statistics, and every buffer is restored afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import time
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import GraphModule

from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.errors import TrainStepError
from qzo_fx.pass_infra import Pass, PassManager
from qzo_fx.train.base_reuse import BaseTaps
from qzo_fx.passes.train.freeze_norm_stats import freeze_norm_stats
from qzo_fx.passes.train.hoist_weight_qdq import hoist_weight_qdq
from qzo_fx.passes.train.incremental_conv import incremental_conv
from qzo_fx.passes.train.incremental_linear import incremental_linear
from qzo_fx.passes.train.lift_params import LiftContext, lift_params
from qzo_fx.passes.train.lower_qdq import lower_qdq
from qzo_fx.passes.train.stream_perturbations import PERTURBER, StreamContext, stream_perturbations
from qzo_fx.passes.train.tap_base import ReuseContext, tap_base
from qzo_fx.train.prologue import PROLOGUE
from qzo_fx.train.random_ops import uses_randomness
from qzo_fx.train.rng import RngState
from qzo_fx.train.workspace import Workspace

__all__ = ["AUTO_ROUNDS", "Branch", "BranchModel", "BranchRunner", "STRATEGIES", "base_graph", "branch_graph", "incremental_graph",
           "perturbed", "sequential_graph"]

STRATEGIES = ("auto", "inplace", "sequential", "batched", "lean")
_CANDIDATES = ("sequential", "inplace", "batched")
AUTO_ROUNDS = 5  # timed steps per candidate before auto settles: a median of 5 rides out a slow step
# (delta per parameter, sign). A delta is a tensor (ZOQO's integer steps) or a pair (v, eps):
# the FOGZO / n-SPSA step eps * v, applied as one fused multiply-add and never materialized.
Delta = Union[Tensor, tuple[Tensor, Tensor]]
Branch = tuple[Sequence[Delta], float]
LossFn = Callable[[Any, Any], Tensor]


BRANCH_PIPELINE = (
    Pass("lift_params", lift_params, "perturbed parameters become inputs: one value per branch, or K stacked"),
    Pass("lower_qdq", lower_qdq, "branches never differentiate: call q/dq kernels without the op wrapper"),
    Pass("freeze_norm_stats", freeze_norm_stats, "functional batch norms: batch statistics, no running update"),
)


def branch_graph(model: GraphModule, names: Sequence[str]) -> GraphModule:
    """The model's graph with parameters ``names`` lifted to leading inputs (shares all state)."""
    gm = GraphModule(model, copy.deepcopy(model.graph), class_name="BranchGraph")
    return PassManager(BRANCH_PIPELINE).run(gm, LiftContext(tuple(names))).graph_module


def base_graph(model: GraphModule, names: Sequence[str], taps: BaseTaps) -> Optional[GraphModule]:
    """The model's graph with its first layers tapped for the branches (None if it has none)."""
    gm = GraphModule(model, copy.deepcopy(model.graph), class_name="BaseGraph")
    result = PassManager((Pass("tap_base", tap_base, "first layers keep x, Q(theta) and their output"),)).run(
        gm, ReuseContext(tuple(names), taps))
    return result.graph_module if result.modified else None


def incremental_graph(model: GraphModule, names: Sequence[str], taps: BaseTaps) -> GraphModule:
    """The branch graph with first layers computed from the base pass."""
    gm = branch_graph(model, names)
    reuse = (Pass("incremental_linear", incremental_linear, "first layers: base output + x @ change of Q(theta)"),
             Pass("incremental_conv", incremental_conv, "first convolutions and their channel-wise chain: "
                  "the base output, changed channels computed again"))
    return PassManager(reuse).run(gm, ReuseContext(tuple(names), taps)).graph_module


def sequential_graph(model: GraphModule, names: Sequence[str], taps: Optional[BaseTaps]) -> GraphModule:
    """What the sequential strategy runs: the branch graph (with incremental first layers when
    the base pass is tapped) whose weight q/dq is hoisted into a prologue (:mod:`qzo_fx.train.prologue`)."""
    gm = branch_graph(model, names) if taps is None else incremental_graph(model, names, taps)
    hoist = Pass("hoist_weight_qdq", hoist_weight_qdq, "weights perturbed and quantized before the graph, not one "
                 "q/dq kernel each")
    return PassManager((hoist,)).run(gm, LiftContext(tuple(names))).graph_module


class Perturber(nn.Module):
    """``forward(theta, i) = theta + sign * eps_i * v_ki``, ``v_ki`` regenerated on the spot."""

    def __init__(self) -> None:
        super().__init__()
        self.directions, self.eps, self.k, self.sign = None, None, 0, 1.0

    def forward(self, theta: Tensor, index: int) -> Tensor:
        v = self.directions.tensor(self.k, index)
        return perturbed(theta, (v, self.eps[index]), self.sign, out=v)  # v's memory holds the result


def lean_graph(model: GraphModule, names: Sequence[str]) -> GraphModule:
    """The model's graph with perturbed reads streamed through a :class:`Perturber`."""
    gm = GraphModule(model, copy.deepcopy(model.graph), class_name="LeanBranchGraph")
    gm.add_submodule(PERTURBER, Perturber())
    passes = (Pass("stream_perturbations", stream_perturbations, "perturbed copies exist one layer at a time"),
              *BRANCH_PIPELINE[1:])
    return PassManager(passes).run(gm, StreamContext(tuple(names))).graph_module


def perturbed(theta: Tensor, delta: Delta, sign: float, out: Optional[Tensor] = None) -> Tensor:
    """``theta + sign * delta`` into ``out``, or in place into ``theta`` when ``out`` is None."""
    if isinstance(delta, tuple):
        v, eps = delta
        if out is None:
            return theta.addcmul_(v, eps, value=sign)
        return torch.addcmul(theta, v, eps, value=sign, out=out)
    alpha = sign if theta.is_floating_point() else int(sign)  # integer codes (ZOQO) take an int
    if out is None:
        return theta.add_(delta, alpha=alpha)
    return torch.add(theta, delta, alpha=alpha, out=out)


class BranchModel:
    """What ``loss_fn`` receives in a branch: calls the branch graph with bound parameter values."""

    def __init__(self, graph: GraphModule, model: nn.Module, values: Sequence[Tensor]) -> None:
        self._graph, self._model, self._values = graph, model, values

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._graph(*self._values, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@contextlib.contextmanager
def _branch_mode(norms: Sequence[nn.Module], buffers: Sequence[Tensor]) -> Iterator[None]:
    """no_grad, frozen BatchNorm statistics, restored buffers and RNG."""
    saved = [b.clone() for b in buffers]
    outer_rng = RngState.capture()
    try:
        for m in norms:
            # With track_running_stats off, a training-mode BatchNorm uses batch statistics
            # and leaves running_mean/var alone: exactly the branch semantics.
            m.track_running_stats = False
        with torch.no_grad():
            yield
    finally:
        for m in norms:
            m.track_running_stats = True
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        outer_rng.restore()


class BranchRunner:
    """Evaluates branch losses for one model, loss function and set of perturbed parameters."""

    def __init__(self, model: GraphModule, loss_fn: LossFn, names: Sequence[str], strategy: str = "auto",
                 max_chunk: int = 64, workspace: Optional[Workspace] = None, taps: Optional[BaseTaps] = None) -> None:
        if strategy not in STRATEGIES:
            raise TrainStepError(f"strategy={strategy!r} is invalid: allowed {STRATEGIES}.")
        self.model, self.loss_fn, self.names = model, loss_fn, tuple(names)
        # Parameters, or integer-code buffers (ZOQO): any tensor attribute, by dotted name.
        self.params = [operator.attrgetter(n)(model) for n in self.names]
        norms = {name: m for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
        self._norms = list(norms.values())
        # Saved and restored around the branches: every buffer but the quantizers' and those of
        # norms the graph calls as modules (with their statistics frozen they write nothing; a
        # norm decomposed into functional ops, as torch.export leaves it, is saved like the rest).
        graph = model.graph if isinstance(model, GraphModule) else None  # partly captured: all saved
        called = {n.target for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
        frozen = tuple(name + "." for name in norms if name in called)
        self._buffers = [b for name, b in model.named_buffers()
                         if not name.startswith(QUANT_CONTAINER + ".") and not name.startswith(frozen)]
        self.strategy, self.max_chunk = strategy, max_chunk
        self.workspace = Workspace.get(workspace)
        self._graph: Optional[GraphModule] = None
        self._lean: Optional[GraphModule] = None
        self.taps, self._sequential_graph = taps, None
        self.timings: dict[str, list[float]] = {}
        self._random, self._warned_masks = uses_randomness(model), False

    @property
    def graph(self) -> GraphModule:
        """The branch graph (built on first use)."""
        if self._graph is None:
            self._graph = branch_graph(self.model, self.names)
        return self._graph

    @property
    def sequential_graph(self) -> GraphModule:
        """What ``sequential`` runs (see :func:`sequential_graph`; built on first use)."""
        if self._sequential_graph is None:
            self._sequential_graph = sequential_graph(self.model, self.names, self.taps)
        return self._sequential_graph

    def streamed_losses(self, directions, eps: Sequence[Tensor], pattern: Sequence[tuple[int, float]],
                        batch: Any, rng_state: RngState) -> Tensor:
        """Loss of each branch ``(k, sign)`` of ``pattern`` with directions streamed (the lean strategy)."""
        if self._lean is None:
            self._lean = lean_graph(self.model, self.names)
        perturber = self._lean.get_submodule(PERTURBER)
        perturber.directions, perturber.eps = directions, eps
        out = []
        try:
            with _branch_mode(self._norms, self._buffers):
                for k, sign in pattern:
                    perturber.k, perturber.sign = k, sign
                    out.append(self._loss(BranchModel(self._lean, self.model, ()), batch, rng_state))
        finally:
            perturber.directions = perturber.eps = None  # hold no step's tensors between steps
        return torch.stack(out)

    def batched_masks_differ(self) -> bool:
        """True where batched branches cannot see the base pass's dropout masks: a model that
        draws random numbers, on CUDA (see :mod:`qzo_fx.train.random_ops`)."""
        return self._random and any(p.device.type == "cuda" for p in self.params)

    def losses(self, branches: Sequence[Branch], batch: Any, rng_state: RngState) -> Tensor:
        """Loss of every branch, shape [K]."""
        if self.strategy == "batched" and not self._warned_masks and self.batched_masks_differ():
            self._warned_masks = True
            warnings.warn("strategy='batched' on CUDA with random ops (dropout): the branches share one mask "
                          "with each other but not with the base pass, because CUDA's fused dropout draws "
                          "masks differently from vmap. Use strategy='sequential' for the base pass's masks.",
                          RuntimeWarning, stacklevel=3)
        if self.strategy == "auto":
            return self._choose(branches, batch, rng_state)
        if self.strategy == "lean":
            raise TrainStepError("strategy='lean' streams directions; this estimator's branches are explicit "
                                 "(ZOQO): use 'inplace', 'sequential', 'batched' or 'auto'.")
        with _branch_mode(self._norms, self._buffers):
            return getattr(self, "_" + self.strategy)(branches, batch, rng_state)

    def _choose(self, branches, batch, rng_state) -> Tensor:
        """Round-robin over the candidates for the first steps (each step is a real step with
        one candidate), then keep the one with the smallest median time."""
        candidates = [c for c in _CANDIDATES if c != "batched" or not self.batched_masks_differ()]
        pending = [c for c in candidates if len(self.timings.setdefault(c, [])) < AUTO_ROUNDS
                   and self.timings[c] != [float("inf")]]
        if not pending:
            medians = {c: sorted(self.timings[c])[len(self.timings[c]) // 2] for c in candidates}
            self.strategy = min(medians, key=medians.get)
            return self.losses(branches, batch, rng_state)
        candidate = min(pending, key=lambda c: len(self.timings[c]))
        self._synchronize()  # on a GPU, time the kernels, not their launch
        start = time.perf_counter()
        try:
            with _branch_mode(self._norms, self._buffers):
                losses = getattr(self, "_" + candidate)(branches, batch, rng_state)
        except Exception as error:  # e.g. a loss_fn that vmap cannot batch (.item()) rules it out
            if candidate == "sequential":
                raise TrainStepError(f"branch evaluation failed: {type(error).__name__}: {error}") from error
            self.timings[candidate] = [float("inf")]
            return self._choose(branches, batch, rng_state)
        self._synchronize()
        self.timings[candidate].append(time.perf_counter() - start)
        return losses

    def _synchronize(self) -> None:
        for device in {p.device for p in self.params if p.device.type == "cuda"}:
            torch.cuda.synchronize(device)

    def _loss(self, model: Any, batch: Any, rng_state: RngState) -> Tensor:
        rng_state.restore()
        return self.loss_fn(model, batch).detach().reshape(())

    def _inplace(self, branches, batch, rng_state) -> Tensor:
        snapshot = self.workspace.like("snapshot", self.params)
        torch._foreach_copy_(snapshot, self.params)  # a full-precision copy: restore is exact
        out = []
        try:
            for deltas, sign in branches:
                torch._foreach_copy_(self.params, snapshot)
                for p, d in zip(self.params, deltas):
                    perturbed(p, d, sign)
                out.append(self._loss(self.model, batch, rng_state))
        finally:
            torch._foreach_copy_(self.params, snapshot)  # never theta + d - d: no drift
        return torch.stack(out)

    def _sequential(self, branches, batch, rng_state) -> Tensor:
        out, values = [], self.workspace.like("values", self.params)
        graph = self.sequential_graph
        prologue = getattr(graph, PROLOGUE, None)
        for deltas, sign in branches:
            # Hoisted weights the compiled pass takes: perturbed and quantized at once; the rest
            # perturbed into one reused buffer set, then the prologue's foreach q/dq.
            fused = prologue.perturb_and_quantize(values, self.params, deltas, sign) if prologue is not None else ()
            for j, (v, p, d) in enumerate(zip(values, self.params, deltas)):
                if j not in fused:
                    perturbed(p, d, sign, out=v)
            if prologue is not None:
                prologue(values, skip=fused)
            out.append(self._loss(BranchModel(graph, self.model, values), batch, rng_state))
        return torch.stack(out)

    def _batched(self, branches, batch, rng_state) -> Tensor:
        graph, model = self.graph, self.model

        def one(*values: Tensor) -> Tensor:
            return self.loss_fn(BranchModel(graph, model, values), batch).reshape(())

        batched = torch.func.vmap(one, randomness="same")
        out = []
        for start in range(0, len(branches), self.max_chunk):
            chunk = branches[start:start + self.max_chunk]
            stacked = [self.workspace.buffer(("stacked", j), (len(chunk), *p.shape), p)
                       for j, p in enumerate(self.params)]
            for k, (deltas, sign) in enumerate(chunk):
                # Written straight into the stacked buffers: one pass, no torch.stack copy.
                for j, p in enumerate(self.params):
                    perturbed(p, deltas[j], sign, out=stacked[j][k])
            rng_state.restore()
            out.append(batched(*stacked).detach())
        return torch.cat(out)
