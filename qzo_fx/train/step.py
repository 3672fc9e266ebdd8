"""``train_step``: one training step for the chosen gradient estimator.

The step writes its gradient estimate into ``.grad``; any torch optimizer then steps::

    step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(beta_min=0.999, total_steps=T))
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        loss = step(batch)
        opt.step()

:class:`TrainStep` is the estimators' context: it runs the base pass, the branches (through a
strategy) and the finiteness check, and holds the step's seed, noise, eps and statistics. The
estimator (:mod:`qzo_fx.train.estimators`) owns the step's math.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import GraphModule

from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.errors import NonFiniteLossError, TrainStepError
from qzo_fx.train import distributed, sharding
from qzo_fx.train.accumulation import add_back, set_aside_gradients
from qzo_fx.train.batches import BatchSignature
from qzo_fx.train.checkpoint import restore_step_state, step_state
from qzo_fx.train.checks import FiniteCheck
from qzo_fx.train.compilation import Compiler, CompileSetting
from qzo_fx.train.directions import Directions
from qzo_fx.train.estimators import STE, Estimator
from qzo_fx.train.graphs import BranchGraphs
from qzo_fx.train.loss_call import checked_loss
from qzo_fx.train.noise import Noise
from qzo_fx.train.perturbed import PerturbedParam, code_tensors, perturbed_params
from qzo_fx.train.reuse import TAPS, BaseTaps
from qzo_fx.train.rng import RngState
from qzo_fx.train.sharding import Shards
from qzo_fx.train.stats import StepStats
from qzo_fx.train.strategies import (
    STRATEGIES,
    Branches,
    BranchModel,
    Strategy,
    StrategyContext,
    build,
    masks_differ,
)
from qzo_fx.train.workspace import Workspace

__all__ = ["train_step", "TrainStep", "StepStats"]

NONFINITE = ("raise", "skip", "unchecked")


class TrainStep:
    """A callable training step; see :func:`train_step`."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], estimator: Estimator,
                 strategy: str = "auto", on_nonfinite: str = "raise", max_chunk: int = 64,
                 noise: str = "auto", compile: CompileSetting = False) -> None:
        if not isinstance(model, nn.Module):
            raise TrainStepError(f"train_step takes the prepared model (an nn.Module), got {type(model).__name__}.")
        if not isinstance(estimator, Estimator):
            raise TrainStepError("estimator must be qzo_fx.STE(), FOGZO(...), NSPSA(...), ZOSign(...) or "
                                 f"ZOQO(...), got {estimator!r}.")
        if on_nonfinite not in NONFINITE:
            raise TrainStepError(f"on_nonfinite={on_nonfinite!r} is invalid: allowed {NONFINITE}.")
        if not isinstance(max_chunk, int) or isinstance(max_chunk, bool) or max_chunk < 1:
            raise TrainStepError(f"max_chunk={max_chunk!r} is invalid: allowed an int >= 1 (branches per pass).")
        if strategy not in STRATEGIES:
            raise TrainStepError(f"strategy={strategy!r} is invalid: allowed {STRATEGIES}.")
        # Under DDP the base pass goes through the wrapper (its backward all-reduces the STE
        # gradient); branches, parameters and quantizers live on the wrapped module.
        self.wrapper, self.model = model, distributed.unwrap(model)
        self.loss_fn, self.estimator, self.requested_strategy = checked_loss(loss_fn), estimator, strategy
        self.on_nonfinite, self.max_chunk = on_nonfinite, max_chunk
        self.stats, self.step_index = StepStats(), 0
        self.noise, self.workspace = Noise(noise), Workspace()
        self.compiler = Compiler(compile)
        self.check = FiniteCheck(enabled=False)
        self.perturbed: list[PerturbedParam] = []
        self.names: tuple[str, ...] = ()
        self.params: list[Tensor] = []
        self.laws: list[str] = []
        self.code_quantizers: list = []
        self.strategy: Optional[Strategy] = None
        self.graphs: Optional[BranchGraphs] = None
        self.sharded = sharding.is_sharded(self.model)  # FSDP2: the perturbed tensors are this rank's shards
        if self.sharded:
            sharding.check_model(self.model)
        self.shards: Optional[Shards] = None
        self._eps_cache: Optional[tuple] = None
        self._batches = BatchSignature()
        self._has_running_stats = any(name.rpartition(".")[2] == "running_mean" for name, _ in model.named_buffers())
        estimator.setup(self)
        self._trainable = self._trainable_now()
        base_seed = getattr(estimator, "seed", None)
        drawn = int(torch.randint(0, 2**31 - 1, ()).item()) if base_seed is None else base_seed
        self.base_seed = distributed.broadcast_int(drawn)  # one seed, hence one s and u, on every rank

    # ------------------------------------------------------------------ what is perturbed
    def use_perturbed(self, perturb: str, reuse_base: bool = False) -> None:
        """Perturb the latent weights feeding quantizers (``"quantized"``) or every trainable
        parameter; ``reuse_base``: sequential branches may reuse the base pass (:mod:`qzo_fx.train.reuse`)."""
        self.perturbed = perturbed_params(self.model, perturb)
        if not self.perturbed:
            raise TrainStepError(f"{type(self.estimator).__name__}: the model has no parameter to perturb: no "
                                 f"trainable weight feeds a quantizer (perturb={perturb!r}). Prepare it with a weight "
                                 "spec (qzo_fx.examine(model, example_inputs) lists the weights left in float, and "
                                 "why), or pass perturb='all' to perturb the float parameters.")
        self.laws = [p.law for p in self.perturbed]
        self._use([p.name for p in self.perturbed], reuse_base)

    def use_codes(self) -> None:
        """Perturb the integer-code buffers of a model switched with ``to_integer_codes`` (ZOQO)."""
        codes = code_tensors(self.model)
        self.code_quantizers = [q for _, q in codes]
        self._use([name for name, _ in codes], parameters=False)

    def _use(self, names: Sequence[str], reuse_base: bool = False, parameters: bool = True) -> None:
        whole = isinstance(self.model, GraphModule) and all(p == "" for p, _ in quantizer_containers(self.model))
        strategy = self.requested_strategy
        if self.sharded:
            strategy = sharding.strategy_for(strategy)
        elif not whole:  # an eager root with prepared parts: only the parameters can be perturbed in place
            if strategy not in ("auto", "inplace"):
                raise TrainStepError(f"strategy={strategy!r} needs a model captured as one graph; this one was "
                                     "prepared partially (see model.qzo_partial): use 'inplace' or 'auto'.")
            strategy = "inplace"
        self.names = tuple(names)
        if self.sharded and parameters:  # ZOQO's codes are buffers: whole on every rank
            self.shards = Shards(self.model, self.names)
        self.compiler.check(strategy, graph_lean=not self.sharded)
        after = (lambda: sharding.reshard(self.model)) if self.sharded else None
        ctx = StrategyContext(self.model, self.loss_fn, self.names, self.workspace, self.max_chunk,
                              None if self.shards is None else self.shards.local, after,
                              self.compiler if self.compiler.enabled else None)
        self.params = ctx.params
        # The base pass is tapped where sequential branches can run: the model's own graph (not
        # through a DDP wrapper, whose backward all-reduces), on CPU (reuse decides on the host;
        # compiled graphs would break at every such decision).
        reuse = (reuse_base and whole and strategy in ("sequential", "auto") and self.wrapper is self.model
                 and not (self.sharded or self.compiler.enabled) and all(p.device.type == "cpu" for p in self.params))
        graphs = whole and not self.sharded  # a sharded model's graphs would read shards outside FSDP's hooks
        self.graphs = BranchGraphs(self.model, self.names, BaseTaps() if reuse else None) if graphs else None
        self.strategy = build(strategy, ctx, None if self.graphs is None else self.graphs.getter)

    @property
    def perturbed_numel(self) -> int:
        """Coordinates of the whole perturbed set (on a sharded model, every rank's shards)."""
        return self.shards.numel if self.shards is not None else sum(p.numel() for p in self.params)

    @property
    def step_seed(self) -> int:
        return self.base_seed + self.step_index

    @property
    def branch_graph(self) -> Optional[GraphModule]:
        """The branch graph (perturbed parameters lifted to inputs); None for the STE."""
        return None if self.graphs is None else self.graphs.get("lifted")

    # ------------------------------------------------------------------ services for estimators
    def base_pass(self, batch: Any) -> tuple[Tensor, RngState]:
        """Forward + backward through the model (or its DDP wrapper): ``(loss, RNG state before)``."""
        rng_state = RngState.capture()
        loss = self.loss_fn(self._base_model(), batch)
        self.stats.forward_passes += 1
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TrainStepError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}.")
        if not loss.requires_grad:
            why = ("train_step ran under torch.no_grad() or torch.inference_mode(): call it outside them"
                   if not torch.is_grad_enabled() else
                   "no parameter it depends on requires grad (all frozen?), or loss_fn detached it")
            raise TrainStepError(f"the base pass's loss has no gradient: {why}.")
        loss.backward()
        self.stats.backward_passes += 1
        self.check.add("base loss", loss.detach())
        self.check.watch("base loss", loss.detach())
        return loss.detach(), rng_state

    def _base_model(self) -> Any:
        """The wrapper, or (training, first convolutions tapped) a stand-in calling the base graph."""
        if self.graphs is None or self.graphs.taps is None:
            return self.compiler(self.wrapper)
        self.graphs.taps.clear()  # values of this step only
        base = self.graphs.get("base") if self.model.training else None
        return BranchModel(base, self.model, ()) if base is not None and hasattr(base, TAPS) else self.wrapper

    @property
    def base_graph(self) -> Optional[GraphModule]:
        """The graph the base pass runs where its first convolutions are tapped, else None."""
        if self.graphs is None or self.graphs.taps is None:
            return None
        base = self.graphs.get("base")
        return base if base is not None and hasattr(base, TAPS) else None

    def eps(self, eps_float: float) -> list[Tensor]:
        """Per-coordinate perturbation sizes, recomputed whenever a scale tensor is replaced or
        changed in place (its version counter moves), reused otherwise."""
        scales = [None if pp.quantizer is None else pp.quantizer.scale for pp in self.perturbed]
        versions = (eps_float, [None if t is None else t._version for t in scales])
        cached = self._eps_cache
        # The cache holds the scale tensors themselves (compared by identity): an id() could be
        # reused by a new scale once the old one is freed.
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], scales)):
            eps = [pp.eps(p, eps_float) for pp, p in zip(self.perturbed, self.params)]
            self._eps_cache = cached = (scales, versions, eps if self.shards is None else self.shards.eps(eps))
        return cached[2]

    def directions(self, laws: Sequence[str], n: int, **guide: Any) -> Directions:
        """The step's n directions on the perturbed tensors (this rank's rows of them when sharded);
        ``guide``: FOGZO's (grads, eps, beta, normalize, noise_form)."""
        shards = self.shards
        return Directions(self.step_seed, self.params, laws, n, self.noise,
                          offsets=None if shards is None else shards.offsets,
                          sum_over_shards=None if shards is None else shards.sum, **guide)

    def gradients(self) -> list[Tensor]:
        """The STE gradient of each perturbed tensor (this rank's rows when sharded), zeros where none."""
        grads = self.shards.gradients() if self.shards is not None else [p.grad for p in self.params]
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]

    def named_gradients(self, others_only: bool = False) -> list[tuple[str, Tensor]]:
        """``(name, .grad)`` of the parameters that have one (local parts when sharded);
        ``others_only``: those outside the perturbed set."""
        perturbed = self.shards.whole if self.shards is not None else self.params
        skip = {id(p) for p in perturbed} if others_only else set()
        return [(n, sharding.local(p.grad)) for n, p in self.model.named_parameters()
                if p.grad is not None and id(p) not in skip]

    def branches(self, directions: Directions, pattern: list[tuple[int, float]], eps: list[Tensor]) -> Branches:
        return Branches(pattern, directions.tensor, eps, lambda: directions.materialize(self.workspace))

    def explicit_branches(self, deltas: list[list[Tensor]], pattern: list[tuple[int, float]]) -> Branches:
        """Branches adding given tensors (integer steps): ``theta + sign * deltas[k]``."""
        return Branches(pattern, lambda k, i: deltas[k][i], None, lambda: deltas)

    def branch_losses(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        """Every branch's loss (averaged over ranks before any differencing), shape [K]."""
        start = time.perf_counter()
        if self.strategy is None:
            raise RuntimeError("branch_losses before setup chose a strategy")  # an estimator bug, not user input
        losses = distributed.all_reduce_mean(self.strategy.losses(branches, batch, rng_state))
        self.stats.branch_seconds += time.perf_counter() - start
        self.stats.forward_passes += len(branches.pattern)
        self.check.add("branch losses", losses)
        self.check.watch("branch losses", losses)
        return losses

    def update_norm_statistics(self, batch: Any) -> None:
        """One no-grad forward of the model as it is, for BatchNorm's running statistics: the
        branches leave them alone (each sees perturbed weights), so an estimator without a base
        pass (n-SPSA, the sign methods, ZOQO) would leave a train-mode model's eval statistics
        where prepare left them. Nothing to do in eval mode or without BatchNorm."""
        if not self.model.training or not self._has_running_stats:
            return
        with torch.no_grad():
            self.loss_fn(self.wrapper, batch)
        self.stats.forward_passes += 1

    def mean_over_ranks(self, value: Tensor) -> Tensor:
        return distributed.all_reduce_mean(value.reshape(1))[0]

    def write_estimate(self, directions: Directions, branches: Branches, coefficients: Tensor,
                       keep: Optional[Tensor] = None, divide_by_eps: bool = True, then_sign: bool = False) -> None:
        """``G = (1/n) sum_k c_k v_k / eps`` into the existing ``.grad`` tensors (fresh ones where a
        parameter has none); ``keep``: a device flag, 0 leaves zeros (the STE gradient of a zero guide)."""
        if self.shards is not None:
            grads = self.shards.gradients_to_write()
        else:
            grads = []
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                grads.append(p.grad)
        directions.write_estimate(grads, coefficients, branches.materialized, divide_by_eps)
        if then_sign:
            torch._foreach_sign_(grads)
        if keep is not None:
            torch._foreach_mul_(grads, keep.to(grads[0].dtype))
        self.check.add_norms("estimate", grads, self.names)

    def check_other_gradients(self) -> None:
        """Register the STE gradients of the parameters outside the perturbed set (they stay)."""
        named = self.named_gradients(others_only=True)
        self.check.add_norms("STE gradient", [g for _, g in named], [n for n, _ in named])

    def watch(self, name: str, value: Tensor) -> None:
        self.check.watch(name, value)

    def refuse_batched_masks(self, why: str) -> None:
        if self.strategy is not None and self.strategy.chosen == "batched" and masks_differ(self.strategy.ctx):
            raise TrainStepError(f"{why}, but with strategy='batched' here (CUDA, or dropout in a torch.export graph) "
                                 "the branches' dropout masks are not the base pass's (see qzo_fx.train.random_ops): "
                                 "use strategy='sequential', 'inplace' or 'auto'.")

    # ------------------------------------------------------------------ the step
    def __call__(self, *batch: Any) -> Tensor:
        """One step on ``batch``; ``step(x, y)`` is ``step((x, y))``, as a DataLoader yields it."""
        if not batch:
            raise TrainStepError("a step needs a batch: step(batch), or step(x, y) for step((x, y)).")
        batch = batch[0] if len(batch) == 1 else batch
        start = time.perf_counter()
        self._batches.check(batch, self.step_index)
        trainable = self._trainable_now()
        if trainable != self._trainable:  # parameters frozen or unfrozen since the last step
            self._eps_cache = None
            self.estimator.setup(self)
            self._trainable = trainable
        self.check = FiniteCheck(enabled=self.on_nonfinite != "unchecked",
                                 sum_over_ranks=sharding.sum_over_ranks if self.sharded else None)
        earlier = set_aside_gradients(self.model)
        try:
            with self._batches.guarded(batch, self.model, self.step_index):
                loss = self.estimator.run(self, batch)
            failures = self.check.failures()  # the step's one host read (none when unchecked)
            self.stats.last_branch_losses = self.check.watched.get("branch losses", [])
            if any(self.check.watched.get("zero guide", [])):
                self.stats.zero_gradient_fallbacks += 1
            self.stats.count_flat(self.check.watched.get("base loss", []), self.stats.last_branch_losses,
                                  self.step_index, self.estimator)
            if failures:
                self._nonfinite(failures)
        finally:
            add_back(earlier)
        self.step_index += 1
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - start
        if self.strategy is not None:
            self.stats.strategy = self.strategy.chosen
        return loss

    def _trainable_now(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())


    def _nonfinite(self, failures: list[str]) -> None:
        self.stats.nonfinite_skips += 1
        for p in self.model.parameters():
            p.grad = None  # no NaN or inf is left for an optimizer to apply (earlier micro-batches' stay)
        message = (f"step {self.step_index}: non-finite {'; '.join(failures)}. Lower the learning rate, check the "
                   "data and the quantizer scales (a scale near 0 gives infinite STE gradients), or pass "
                   "on_nonfinite='skip' to skip such steps.")
        if self.on_nonfinite == "raise":
            self.step_index += 1
            self.stats.steps += 1
            raise NonFiniteLossError(message + " This step's gradients were dropped.")
        warnings.warn(message + " Step skipped (its gradients dropped).", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Schedule position, seed, counters, the chosen strategy and the torch RNG state: saved
        with the model and optimizer, a resumed run follows the same trajectory bit for bit."""
        return step_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_step_state(self, state)


def train_step(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], estimator: Optional[Estimator] = None, *,
               strategy: str = "auto", on_nonfinite: str = "raise", max_chunk: int = 64,
               noise: str = "auto", compile: CompileSetting = False) -> TrainStep:
    """Build the training step of ``model`` for ``estimator``.

    Args:
        model: a prepared model (:func:`qzo_fx.prepare`), or its DDP wrapper.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``. In perturbation branches it
            receives a stand-in that calls the branch graph and resolves attributes on the
            model; it must not depend on global state it changes.
        estimator: ``STE()`` (default), ``FOGZO(...)``, ``NSPSA(...)``, ``ZOSign(...)`` or ``ZOQO(...)``.
        strategy: how branches run: "auto", "inplace", "sequential", "batched" or "lean".
        on_nonfinite: a NaN or inf in a loss, STE gradient or estimate: "raise"
            (NonFiniteLossError naming it) or "skip" (warn, clear gradients, count in
            ``stats.nonfinite_skips``); both read the step's values once at its end.
            "unchecked" never reads them (no host sync on a GPU; statistics stay empty).
        max_chunk: at most this many branches per batched call (memory bound).
        noise: "auto" (the compiled counter stream on CPU where numba is installed, else torch
            generators on the parameters' device), "torch" or "compiled".
        compile: torch.compile the base pass (forward and backward) and the branch forwards
            (:mod:`qzo_fx.train.compilation`): True, or a dict of ``torch.compile`` keyword
            arguments. Each is compiled on its first call; ``batched`` and graph ``lean`` are refused.

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(4, 2), qzo_fx.QuantConfig(weight_bits=2))
        >>> step = qzo_fx.train_step(qm, lambda m, b: m(b).square().mean(), qzo_fx.FOGZO(total_steps=10, seed=0))
        >>> float(step(torch.randn(8, 4))) > 0
        True
    """
    return TrainStep(model, loss_fn, STE() if estimator is None else estimator, strategy, on_nonfinite, max_chunk,
                     noise, compile)
