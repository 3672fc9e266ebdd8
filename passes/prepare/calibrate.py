"""Calibrate: initialise activation scales from one forward pass on the example inputs.

Weight quantizers are initialised when inserted (from the weight itself); activation
quantizers need data. The pass runs the graph once in eval mode under ``no_grad`` and restores
every buffer afterwards, so calibration never changes the model's state (BatchNorm statistics).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from qzo_fx.context import QUANT_CONTAINER, QUANTIZER_KEY, PrepareContext
from qzo_fx.errors import CalibrationError
from qzo_fx.capture.modes import mode
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["calibrate", "pending_quantizers"]


def pending_quantizers(gm: GraphModule) -> dict[str, Quantizer]:
    container = getattr(gm, QUANT_CONTAINER, None)
    if container is None:
        return {}
    return {n: q for n, q in container.named_children() if isinstance(q, Quantizer) and not bool(q.initialized)}


class _Calibrator(Interpreter):
    def __init__(self, gm: GraphModule, pending: dict[str, Quantizer]) -> None:
        super().__init__(gm)
        self.pending = pending

    def run_node(self, node: Node) -> Any:
        qname = node.meta.get(QUANTIZER_KEY)
        if qname in self.pending:
            quantizer = self.pending.pop(qname)
            quantizer.initialize(self.env[node.args[0]])
            # The scale was read before initialisation: hand the op the fresh one.
            self.env[node.args[1]] = quantizer.scale
            if not quantizer.is_sign:
                self.env[node.args[2]] = quantizer.zero_point
        return super().run_node(node)


def _positional(gm: GraphModule, args, kwargs) -> tuple:
    """Inputs in placeholder order (an Interpreter takes positional values only)."""
    if not kwargs:
        return tuple(args)
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def calibrate(gm: GraphModule, *, ctx: PrepareContext) -> PassResult:
    pending = pending_quantizers(gm)
    if not pending:
        return PassResult(gm, False)
    if ctx.example_inputs is None:
        raise CalibrationError(
            f"Activation quantizers {sorted(pending)} need data to set their scales: pass "
            "example_inputs=(x,) to prepare(), or set activation=None in the QuantConfig.")
    buffers = {name: b.clone() for name, b in gm.named_buffers() if not name.startswith(QUANT_CONTAINER + ".")}
    try:
        with mode(gm, False), torch.no_grad():
            _Calibrator(gm, dict(pending)).run(*_positional(gm, ctx.example_inputs, ctx.example_kwargs))
    finally:
        with torch.no_grad():
            for name, value in buffers.items():
                gm.get_buffer(name).copy_(value)
    left = pending_quantizers(gm)
    if left:
        raise CalibrationError(f"Activation quantizers {sorted(left)} were not reached by the example inputs.")
    return PassResult(gm, True)
