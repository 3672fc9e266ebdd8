"""Calibrate: initialise activation scales from the example inputs, as training sees them.

Weight quantizers are initialised when inserted (from the weight itself); activation quantizers
need data. The pass runs the model on the example inputs in train mode, with the pending
quantizers passing values through unquantized, and sets each scale from what it saw; a quantizer
that only the eval-mode graph reaches (an eval-only branch) is set from an eval-mode run. Train
mode decides because QAT trains with these scales, and because at random init BatchNorm's
running statistics (0 and 1) describe no activation: eval-mode activations of a deep CNN then
vanish (MobileNet, EfficientNet) or explode (Inception) by orders of magnitude, and scales fit to
them would zero or saturate every training step. A trained network's batch statistics are close
to its running ones, so its eval mode is served too; a random-init network's eval mode comes
right as its running statistics follow training. Each run is under ``no_grad`` with buffers
(BatchNorm statistics) and the random number generators restored: calibration changes no state.

An activation that is exactly zero on the examples (a ReLU dead at init), or float noise next
to the model's other activations (at most :data:`NOISE_FRACTION` of their median range: the
mean of a normalized tensor), carries no range: its quantizer gets the median scale of the
model's other activation quantizers (a typical range for later values;
:data:`MIN_ACTIVATION_SCALE` if there is none) and a warning names it. Any other range, however
small, sets its own scale.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node

from qzo_fx.capture.modal import graph_of_mode
from qzo_fx.capture.tracing import modes_kept
from qzo_fx.context import QUANT_CONTAINER, QUANTIZER_KEY, PrepareContext
from qzo_fx.errors import CalibrationError
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["calibrate", "pending_quantizers", "MIN_ACTIVATION_SCALE"]

# The step given to an activation that was all zeros when no other activation gives a typical one.
MIN_ACTIVATION_SCALE = 1e-5
# An activation range at most this fraction of the model's median activation range is float
# noise (a cancellation), not a range to fit a grid to.
NOISE_FRACTION = 1e-6


def pending_quantizers(gm: GraphModule) -> dict[str, Quantizer]:
    container = getattr(gm, QUANT_CONTAINER, None)
    if container is None:
        return {}
    return {n: q for n, q in container.named_children() if isinstance(q, Quantizer) and not bool(q.initialized)}


class _Observer(Interpreter):
    """Runs the graph with pending quantizers as identities, keeping what each one is given
    (only its minimum and maximum where those decide the scale)."""

    def __init__(self, gm: GraphModule, pending: dict[str, Quantizer], seen: dict[str, list[Tensor]]) -> None:
        super().__init__(gm)
        self.pending, self.seen = pending, seen

    def run_node(self, node: Node) -> Any:
        qname = node.meta.get(QUANTIZER_KEY)
        if qname in self.pending:
            x = self.env[node.args[0]].detach().float()
            if x.numel():
                keep = x.aminmax() if self.pending[qname].spec.scale_init == "maxabs" else (x.reshape(-1),)
                self.seen[qname].extend(t.reshape(-1).clone() for t in keep)
            return self.env[node.args[0]]
        return super().run_node(node)


def _positional(gm: GraphModule, args, kwargs) -> tuple:
    """Inputs in placeholder order (an Interpreter takes positional values only)."""
    if not kwargs:
        return tuple(args)
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _observe(gm: GraphModule, training: bool, inputs, pending: dict[str, Quantizer], seen) -> None:
    buffers = {name: b.clone() for name, b in gm.named_buffers() if not name.startswith(QUANT_CONTAINER + ".")}
    devices = sorted({b.device for b in gm.buffers()} | {p.device for p in gm.parameters()}, key=str)
    try:
        with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]), torch.no_grad(), \
                modes_kept(gm, training), graph_of_mode(gm, training):
            _Observer(gm, pending, seen).run(*_positional(gm, *inputs))
    finally:
        with torch.no_grad():
            for name, value in buffers.items():
                gm.get_buffer(name).copy_(value)


def _initialize(pending: dict[str, Quantizer], seen: dict[str, list[Tensor]]) -> None:
    values = {name: torch.cat(seen[name]) for name in pending if seen[name]}
    reach = {name: float(v.abs().max()) for name, v in values.items()}
    active = [reach[n] for n, q in pending.items() if q.role == "activation" and reach.get(n, 0.0) > 0]
    typical_reach = float(torch.tensor(active).median()) if active else 0.0
    # No range at all, or only float noise next to the model's other activations (the mean of
    # an InstanceNorm output: 1e-8 where values reach 1): a scale fit to it would saturate
    # every later value. Such quantizers get the typical step of the others, with a warning.
    degenerate = [n for n, q in pending.items() if q.role == "activation" and n in reach
                  and reach[n] <= NOISE_FRACTION * typical_reach]
    for name, quantizer in pending.items():
        if name in reach and name not in degenerate:
            quantizer.initialize(values[name])
    if degenerate:
        _typical_step(pending, degenerate, reach)


def _typical_step(pending: dict[str, Quantizer], degenerate: list[str], reach: dict[str, float]) -> None:
    scales = [float(q.scale.detach()) for n, q in pending.items()
              if q.role == "activation" and n not in degenerate and bool(q.initialized) and q.scale.dim() == 0]
    typical = float(torch.tensor(scales).median()) if scales else MIN_ACTIVATION_SCALE
    for name in degenerate:
        quantizer = pending[name]
        qmin, qmax = quantizer.spec.qrange
        # A grid from 0 upwards (unsigned) or centred (signed) with the typical step.
        span = typical * (qmax - qmin)
        quantizer.initialize(torch.tensor([0.0, span] if qmin >= 0 else [-span / 2, span / 2]))
    shown = ", ".join(f"{n} (max |x| {reach[n]:.3g})" for n in degenerate[:8]) + (" ..." if len(degenerate) > 8 else "")
    warnings.warn(
        f"{len(degenerate)} activation quantizer(s) saw only zeros or float noise on the example inputs "
        f"(at most {NOISE_FRACTION:g} of the others' typical range) and got the median step of the others "
        f"({typical:.3g}): {shown}. Calibrate with representative inputs (example_inputs=...), or learn the "
        "scales (QuantSpec(learn_scale=True)).", RuntimeWarning, stacklevel=5)


def calibrate(gm: GraphModule, *, ctx: PrepareContext) -> PassResult:
    pending = pending_quantizers(gm)
    if not pending:
        return PassResult(gm, False)
    if ctx.inputs_for(False) is None and ctx.inputs_for(True) is None:
        raise CalibrationError(
            f"Activation quantizers {sorted(pending)} need data to set their scales: pass "
            "example_inputs=(x,) to prepare(), or set activation=None in the QuantConfig.")
    seen: dict[str, list[Tensor]] = {name: [] for name in pending}
    for training in (True, False):
        inputs = ctx.inputs_for(training)
        unseen = {name: q for name, q in pending.items() if not seen[name]}
        if inputs is not None and unseen:  # eval mode only for what training never reached
            _observe(gm, training, inputs, unseen, seen)
    _initialize(pending, seen)
    left = pending_quantizers(gm)
    if left:
        raise CalibrationError(f"Activation quantizers {sorted(left)} were not reached by the example inputs.")
    return PassResult(gm, True)
