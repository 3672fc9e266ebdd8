"""``train_step``: one training step for the chosen gradient estimator.

The step writes its gradient estimate into ``.grad``; any torch optimizer then steps::

    step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(beta_min=0.999, total_steps=T))
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        loss = step(batch)
        opt.step()
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from qzo_fx.train import distributed

from qzo_fx.train import zo_math
from qzo_fx.train.base_reuse import TAPS, BaseTaps
from qzo_fx.train.branches import STRATEGIES, BranchRunner, BranchModel, base_graph
from qzo_fx.errors import BatchError, NonFiniteLossError, TrainStepError
from qzo_fx.train.estimators import FOGZO, NSPSA, STE, ZOQO, ZOSign
from qzo_fx.train.perturbed import PerturbedParam, code_tensors, perturbed_params
from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.train.rng import RngState
from qzo_fx.train.workspace import Workspace

__all__ = ["train_step", "TrainStep", "StepStats"]


@dataclass
class StepStats:
    """Compute accounting (fwd = 1, bwd = 2 forward-pass equivalents) and branch timing."""

    steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    branch_seconds: float = 0.0
    step_seconds: float = 0.0
    beta: Optional[float] = None
    nonfinite_skips: int = 0
    zero_gradient_fallbacks: int = 0
    strategy: Optional[str] = None
    last_branch_losses: list[float] = field(default_factory=list)

    @property
    def fwd_equivalents(self) -> int:
        return self.forward_passes + 2 * self.backward_passes


def _graph_strategy_or_inplace(model: nn.Module, strategy: str) -> str:
    """Graph strategies need every quantizer in the root graph; a partially captured model (eager
    root, prepared parts) runs its branches in place."""
    whole = isinstance(model, GraphModule) and all(prefix == "" for prefix, _ in quantizer_containers(model))
    if whole:
        return strategy
    if strategy not in ("auto", "inplace"):
        raise TrainStepError(f"strategy={strategy!r} needs a model captured as one graph; this one was prepared "
                             "partially (see model.qzo_partial): use strategy='inplace' or 'auto'.")
    return "inplace"


def _describe(estimator: Any) -> str:
    """The estimator's settings without its seed (a checkpoint restores the seed itself)."""
    fields = dataclasses.fields(estimator) if dataclasses.is_dataclass(estimator) else ()
    return repr(dataclasses.replace(estimator, seed=None)) if any(f.name == "seed" for f in fields) else repr(estimator)


class TrainStep:
    """A callable training step; see :func:`train_step`."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], estimator: Any,
                 strategy: str = "auto", on_nonfinite: str = "raise", max_chunk: int = 64) -> None:
        if not isinstance(model, nn.Module):
            raise TrainStepError(f"train_step takes the prepared model (an nn.Module), got {type(model).__name__}.")
        if not isinstance(estimator, (STE, FOGZO, NSPSA, ZOSign, ZOQO)):
            raise TrainStepError("estimator must be qzo_fx.STE(), FOGZO(...), NSPSA(...), ZOSign(...) or "
                                 f"ZOQO(...), got {estimator!r}.")
        if on_nonfinite not in ("raise", "skip"):
            raise TrainStepError(f"on_nonfinite={on_nonfinite!r} is invalid: allowed 'raise' or 'skip'.")
        if strategy not in STRATEGIES:
            raise TrainStepError(f"strategy={strategy!r} is invalid: allowed {STRATEGIES}.")
        # Under DDP the base pass goes through the wrapper (its backward all-reduces the STE
        # gradient); branches, parameters and quantizers live on the wrapped module.
        self.wrapper, model = model, distributed.unwrap(model)
        self.model, self.loss_fn, self.estimator = model, loss_fn, estimator
        self.on_nonfinite, self.stats, self.step_index = on_nonfinite, StepStats(), 0
        self.perturbed: list[PerturbedParam] = []
        self.runner: Optional[BranchRunner] = None
        self.workspace = Workspace()  # noise, deltas and branch values: allocated once
        self._materialized: Optional[list] = None  # this step's directions, unless streamed
        self._base: Optional[GraphModule] = None  # the base pass with first layers tapped
        self._eps_cache: Optional[tuple] = None  # (scale tensors, their versions, eps tensors)
        if isinstance(estimator, ZOQO):
            self.codes = code_tensors(model)
            self.runner = BranchRunner(model, loss_fn, [name for name, _ in self.codes], strategy, max_chunk,
                                       self.workspace)
        elif not isinstance(estimator, STE):
            strategy = _graph_strategy_or_inplace(model, strategy)
            self.perturbed = perturbed_params(model, estimator.perturb)
            if not self.perturbed:
                raise TrainStepError(f"{type(estimator).__name__}: the model has no parameter to perturb; "
                                     "prepare it with a weight spec, or use perturb='all'.")
            names = [p.name for p in self.perturbed]
            self._base = self._tapped_base(model, names, strategy)
            self.runner = BranchRunner(model, loss_fn, names, strategy, max_chunk, self.workspace,
                                       taps=None if self._base is None else self._base.get_submodule(TAPS))
        base_seed = getattr(estimator, "seed", None)
        drawn = int(torch.randint(0, 2**31 - 1, ()).item()) if base_seed is None else base_seed
        self.base_seed = distributed.broadcast_int(drawn)  # one seed, hence one s and u, on every rank
        self._batch_signature: Optional[list[tuple]] = None

    def _tapped_base(self, model: nn.Module, names: list[str], strategy: str) -> Optional[GraphModule]:
        """The base-pass graph whose first layers sequential branches reuse (see
        :mod:`qzo_fx.train.base_reuse`); None where it cannot serve: DDP (the base pass must go through
        the wrapper), strategies other than sequential/auto, models without a first layer."""
        if self.wrapper is not model or strategy not in ("sequential", "auto") or not isinstance(self.estimator, FOGZO):
            return None
        return base_graph(model, names, BaseTaps())

    @property
    def base_graph(self) -> Optional[GraphModule]:
        """The graph the base pass runs when first layers are tapped for the branches, else None."""
        return self._base

    @property
    def branch_graph(self):
        """The branch graph (perturbed parameters lifted to inputs); None for the STE."""
        return None if self.runner is None else self.runner.graph

    def __call__(self, batch: Any) -> Tensor:
        start = time.perf_counter()
        self._check_batch(batch)
        estimator = self.estimator
        if isinstance(estimator, (NSPSA, ZOSign)):
            loss = self._nspsa(batch)
        elif isinstance(estimator, ZOQO):
            loss = self._zoqo(batch)
        elif isinstance(estimator, FOGZO) and self.step_index >= estimator.ste_steps:
            loss = self._fogzo(batch)
        else:
            loss, _, _ = self._ste(batch)
        self.step_index += 1
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - start
        if self.runner is not None:
            self.stats.strategy = self.runner.strategy
        return loss

    # ------------------------------------------------------------------ estimators
    def _ste(self, batch: Any) -> tuple[Tensor, Tensor, bool]:
        """Base forward + backward; returns (loss, RNG state before the forward, finite?)."""
        rng_state = RngState.capture()
        model = self.wrapper
        if self._base is not None:
            self.runner.taps.clear()  # values of this step only
            model = BranchModel(self._base, self.model, ())
        loss = self.loss_fn(model, batch)
        self.stats.forward_passes += 1
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TrainStepError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}.")
        if not self._check_finite([loss.item()], "base"):
            return loss.detach(), rng_state, False
        loss.backward()
        self.stats.backward_passes += 1
        return loss.detach(), rng_state, True

    def _fogzo(self, batch: Any) -> Tensor:
        est: FOGZO = self.estimator
        loss, rng_state, finite = self._ste(batch)
        if not finite:
            return loss
        beta = est.beta(self.step_index)
        self.stats.beta = beta
        params, eps = self.runner.params, self._eps(est.eps_float)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        directions = zo_math.Directions(self.base_seed + self.step_index, params, [p.law for p in self.perturbed],
                                        est.n, grads=grads, eps=eps, beta=beta, normalize=est.normalize,
                                        noise=est.noise)
        if not directions.valid:
            self.stats.zero_gradient_fallbacks += 1
            return loss
        if not est.two_sided and self.runner.strategy == "batched" and self.runner.batched_masks_differ():
            raise TrainStepError("one-sided FOGZO differences each branch against the base loss, but with "
                                 "strategy='batched' on CUDA the branches' dropout masks are not the base pass's "
                                 "(see qzo_fx.train.random_ops): use strategy='sequential', 'inplace' or 'auto'.")
        losses = self._branch_losses(directions, eps, batch, rng_state, est.two_sided)
        if losses is None:
            return loss
        values = losses.tolist()  # n floats: plain arithmetic, no tensor ops
        if est.two_sided:
            coefficients = [(plus - minus) / 2 for plus, minus in zip(values[0::2], values[1::2])]
        else:
            base = float(loss)
            coefficients = [value - base for value in values]
        self._write(params, coefficients, directions, eps)
        return loss

    def _nspsa(self, batch: Any) -> Tensor:
        """n-SPSA, and ZO-sign (the same branches, a sign taken afterwards)."""
        est = self.estimator
        rng_state = RngState.capture()
        params = self.runner.params
        if est.eps is not None:
            eps = [torch.tensor(est.eps, dtype=p.dtype, device=p.device) for p in params]
        else:
            eps = self._eps(est.eps_float)
        laws = ["gaussian" if est.noise == "gaussian" else p.law for p in self.perturbed]
        directions = zo_math.Directions(self.base_seed + self.step_index, params, laws, est.n)
        losses = self._branch_losses(directions, eps, batch, rng_state, two_sided=True)
        if losses is None:
            return torch.tensor(float("nan"))
        coefficients = ((losses[0::2] - losses[1::2]) / 2).tolist()
        if isinstance(est, ZOSign) and est.variant == "scalar":
            # "ZO-SGD-Sign": mean_i sign(c_i) u_i -- no division by eps.
            self._write(params, [math.copysign(1.0, c) if c else 0.0 for c in coefficients], directions,
                        [torch.ones((), dtype=p.dtype, device=p.device) for p in params])
        else:
            self._write(params, coefficients, directions, eps)
        if isinstance(est, ZOSign) and est.variant == "elementwise":
            for p in params:
                p.grad.sign_()  # ZO-SignSGD: element-wise sign of the averaged estimate
        return losses.mean()

    def _zoqo(self, batch: Any) -> Tensor:
        """Two queries on the grid, then a whole-step move of every code (no autograd)."""
        est: ZOQO = self.estimator
        rng_state = RngState.capture()
        stream = zo_math.NoiseStream(self.base_seed + self.step_index)
        steps = [quantizer.step_size(quantizer.codes.float()) for _, quantizer in self.codes]
        noise, plus, minus = [], [], []
        for (_, quantizer), step in zip(self.codes, steps):
            m = torch.clamp_min(torch.floor(est.mu / step), 1)
            j = zo_math.zoqo_noise(stream, m, quantizer.codes, est.noise)
            d_plus, d_minus = zo_math.zoqo_deltas(quantizer.codes, j, *quantizer.spec.qrange)
            noise.append(j), plus.append(d_plus), minus.append(d_minus)
        losses = self._run_branches([(plus, 1.0), (minus, -1.0)], batch, rng_state)
        if losses is None:
            return torch.tensor(float("nan"))
        direction = float(torch.sign(losses[0] - losses[1]))
        with torch.no_grad():
            for (_, quantizer), j, step in zip(self.codes, noise, steps):
                moves = torch.clamp_min(torch.floor(est.lr / step), 1)
                zo_math.zoqo_update_(quantizer.codes, j, moves, direction, *quantizer.spec.qrange)
        return losses.mean()

    # ------------------------------------------------------------------ helpers
    def _eps(self, eps_float: float) -> list[Tensor]:
        """Per-coordinate perturbation sizes of this step. Scales may be learned or re-calibrated:
        the sizes are recomputed whenever a scale tensor is replaced or changed in place (its
        version counter moves), and reused otherwise."""
        scales = [None if pp.quantizer is None else pp.quantizer.scale for pp in self.perturbed]
        versions = (eps_float, [None if t is None else t._version for t in scales])
        cached = self._eps_cache
        # The cache holds the scale tensors themselves (compared by identity): an id() could be
        # reused by a new scale once the old one is freed.
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], scales)):
            self._eps_cache = cached = (scales, versions,
                                        [pp.eps(p, eps_float) for pp, p in zip(self.perturbed, self.runner.params)])
        return cached[2]

    def _branch_losses(self, directions: zo_math.Directions, eps, batch, rng_state, two_sided: bool) -> Optional[Tensor]:
        pattern = [(k, sign) for k in range(directions.n) for sign in ((1.0, -1.0) if two_sided else (1.0,))]
        if self.runner.strategy == "lean":
            self._materialized = None
            return self._run_branches(None, batch, rng_state, lambda: self.runner.streamed_losses(
                directions, eps, pattern, batch, rng_state))
        self._materialized = directions.materialize(self.workspace)
        # Each branch applies eps * v_k as one multiply-add: no delta tensors.
        deltas = [list(zip(v, eps)) for v in self._materialized]
        return self._run_branches([(deltas[k], sign) for k, sign in pattern], batch, rng_state)

    def _run_branches(self, branches, batch, rng_state, streamed=None) -> Optional[Tensor]:
        start = time.perf_counter()
        raw = streamed() if streamed is not None else self.runner.losses(branches, batch, rng_state)
        # Averaged over ranks before any differencing: every rank then writes the same estimate.
        losses = distributed.all_reduce_mean(raw)
        self.stats.last_branch_losses = losses.tolist()  # before the clock stops: on a GPU this waits for the branches
        self.stats.branch_seconds += time.perf_counter() - start
        self.stats.forward_passes += len(losses)
        return losses if self._check_finite(self.stats.last_branch_losses, "branch") else None

    # ------------------------------------------------------------------ state and checks
    def state_dict(self) -> dict[str, Any]:
        """Schedule position, seed, counters, the chosen strategy and the torch RNG state: saved
        with the model and optimizer, a resumed run follows the same trajectory bit for bit."""
        return {"step_index": self.step_index, "base_seed": self.base_seed, "stats": dataclasses.asdict(self.stats),
                "estimator": _describe(self.estimator), "torch_rng": torch.get_rng_state(),
                "strategy": None if self.runner is None else self.runner.strategy,
                "timings": None if self.runner is None else self.runner.timings,
                "batch_signature": self._batch_signature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("estimator") != _describe(self.estimator):
            raise TrainStepError(f"checkpoint was written for {state.get('estimator')}, this step uses "
                                 f"{_describe(self.estimator)}; build the step with the same estimator to resume.")
        self.step_index, self.base_seed = state["step_index"], state["base_seed"]
        self.stats = StepStats(**state["stats"])
        self._batch_signature = state.get("batch_signature")
        torch.set_rng_state(state["torch_rng"])
        if self.runner is not None and state.get("strategy"):
            self.runner.strategy, self.runner.timings = state["strategy"], state["timings"]

    def _check_batch(self, batch: Any) -> None:
        """Every batch must have the structure, dtypes and trailing shapes of the first one:
        a wrong batch fails here, before any parameter or buffer changes."""
        # Float inputs keep their trailing shape; integer tensors (tokens, labels) may vary in length.
        signature = [(i, t.dtype, tuple(t.shape[1:]) if t.is_floating_point() else ("ndim", t.dim()))
                     for i, t in enumerate(tree_leaves(batch)) if isinstance(t, Tensor)]
        if self._batch_signature is None:
            self._batch_signature = signature
            return
        if signature != self._batch_signature:
            expected = ", ".join(f"#{i} {d} {s}" for i, d, s in self._batch_signature)
            got = ", ".join(f"#{i} {d} {s}" for i, d, s in signature)
            raise BatchError(f"step {self.step_index}: batch tensors do not match the first batch "
                             f"(expected {expected}; got {got}). Nothing was changed; fix the data pipeline.")

    def _check_finite(self, losses: list[float], where: str) -> bool:
        if all(math.isfinite(value) for value in losses):
            return True
        self.stats.nonfinite_skips += 1
        message = (f"step {self.step_index}: non-finite {where} loss {losses}; lower the learning rate "
                   "or check the data, or pass on_nonfinite='skip' to skip such steps.")
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(message)
        warnings.warn(message + " Step skipped (gradients cleared).", RuntimeWarning, stacklevel=3)
        for p in self.model.parameters():
            p.grad = None
        return False

    def _write(self, params, coefficients, directions: zo_math.Directions, eps) -> None:
        """G replaces the STE gradient: written into the existing ``.grad`` tensors (no new
        allocation), or fresh ones where a parameter has none (n-SPSA has no backward). With
        streamed (lean) directions each tensor's estimate is regenerated on its own."""
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        if self._materialized is not None:
            zo_math.combine(coefficients, self._materialized, eps, out=[p.grad for p in params])
            return
        for i, p in enumerate(params):
            p.grad.copy_(directions.estimate(i, coefficients, eps[i]))


def train_step(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], estimator: Any = None, *,
               strategy: str = "auto", on_nonfinite: str = "raise", max_chunk: int = 64) -> TrainStep:
    """Build the training step of ``model`` for ``estimator``.

    Args:
        model: a prepared model (:func:`qzo_fx.prepare`).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``. In perturbation branches (and in
            FOGZO's base pass with "sequential"/"auto", which taps first layers for the branches)
            it receives a stand-in that calls the graph and resolves attributes on the model; it
            must not depend on global state it changes.
        estimator: ``STE()`` (default), ``FOGZO(...)`` or ``NSPSA(...)``.
        strategy: how branches run: "auto", "inplace", "sequential", "batched" or "lean".
        on_nonfinite: "raise" (NonFiniteLossError) or "skip" (warn, clear gradients, count).
        max_chunk: at most this many branches per batched call (memory bound).

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(4, 2), qzo_fx.QuantConfig(weight_bits=2))
        >>> step = qzo_fx.train_step(qm, lambda m, b: m(b).square().mean(), qzo_fx.FOGZO(total_steps=10, seed=0))
        >>> float(step(torch.randn(8, 4))) > 0
        True
    """
    return TrainStep(model, loss_fn, STE() if estimator is None else estimator, strategy, on_nonfinite, max_chunk)
