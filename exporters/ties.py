"""Rounding ties between PyTorch and ONNX Runtime, found quantizer by quantizer.

Two correct float implementations of the same graph differ in the last bits (GEMM accumulation
order, LayerNorm, Erf, Softmax). Where a quantizer's input lands within that noise of a rounding
boundary, torch and ORT pick neighbouring codes: a *tie*, which neither side gets wrong. In a deep
network one tied code can grow into several output steps, and an output-only comparison then
cannot tell it from an export bug.

This module runs the file with every activation QuantizeLinear's input and codes exposed, then
runs the eval-mode model with each activation quantizer compared against ORT's codes as it goes.
A differing code is a tie when the two quantizer inputs agree to float precision (``RTOL`` of
the tensor's range, ~1/100 of a step at 8 bits) and torch's rounding of ORT's input gives ORT's
code; ties take ORT's code, so the rest of the model sees what ORT saw. Any other differing code
is *unexplained*: a real disagreement (wrong scale, zero point or op), left as torch computed it,
reported, and a parity failure.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qzo_fx.exporters.export_context import EXPORT_CONTAINER
from qzo_fx.capture.modes import mode
from qzo_fx.quant.ops import grid_codes
from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["TieCount", "probe_model", "activation_scale_names", "tie_resolved_outputs", "resolve_codes"]

RTOL = 1e-4  # inputs closer than this fraction of the tensor's range agree "to float precision"


@dataclass
class TieCount:
    codes: int = 0          # activation codes compared
    ties: int = 0           # differing codes whose inputs agree to float precision (ORT's taken)
    unexplained: int = 0    # differing codes with differing inputs: a real disagreement


def activation_scale_names(qm: nn.Module) -> dict[int, str]:
    """``data_ptr`` of each activation quantizer's scale -> its scale initializer in the file."""
    found = {}
    for prefix, container in quantizer_containers(qm):
        for name, quantizer in container.named_children():
            if isinstance(quantizer, Quantizer) and quantizer.role == "activation" and not quantizer.is_sign:
                where = f"{prefix}.{EXPORT_CONTAINER}" if prefix else EXPORT_CONTAINER
                found[quantizer.scale.data_ptr()] = f"{where}.{name}.scale"
    return found


def probe_model(model: onnx.ModelProto, scale_names: set[str]) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """A copy of ``model`` whose activation QuantizeLinear inputs and codes are graph outputs.

    Returns the copy and, in node order, ``(scale name, input name, codes name)`` per probe."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    graph, probes = probed.graph, []
    exposed = {o.name for o in graph.output} | {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in scale_names:
            continue
        probes.append((node.input[1], node.input[0], node.output[0]))
        for name in (node.input[0], node.output[0]):
            if name not in exposed:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                exposed.add(name)
    return probed, probes


def resolve_codes(x_torch: Tensor, x_ort: Tensor, codes_ort: Tensor, scale: Tensor, zero_point: Tensor,
                  qmin: int, qmax: int, out: Tensor, count: TieCount) -> Tensor:
    """``out`` (torch's fake-quant of ``x_torch``, per-tensor) with ties set to ORT's codes."""
    def codes(x: Tensor) -> Tensor:
        return grid_codes(x, scale, zero_point, qmin, qmax)

    codes_torch = codes(x_torch)
    codes_ort = codes_ort.to(codes_torch.dtype).clamp_(qmin, qmax)
    differ = codes_torch != codes_ort
    # A tie: the inputs agree to float precision and torch's own rounding of ORT's input gives
    # ORT's code -- the codes differ only because the inputs straddle a boundary.
    close = (x_torch - x_ort).abs() <= RTOL * float(x_ort.abs().max())
    ties = differ & close & (codes(x_ort) == codes_ort)
    count.codes += codes_torch.numel()
    count.ties += int(ties.sum())
    count.unexplained += int((differ & ~ties).sum())
    return torch.where(ties, codes_ort.sub(zero_point).mul(scale), out)


class _FollowOrtTies(TorchDispatchMode):
    """Dispatch mode: each activation ``qzo.fake_quant`` call is checked against ORT's next probe
    of the same quantizer (calls and QuantizeLinear nodes come in the same order per quantizer)."""

    def __init__(self, scale_names: dict[int, str], probes: dict[str, deque], count: TieCount) -> None:
        super().__init__()
        self.scale_names, self.probes, self.count = scale_names, probes, count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.qzo.fake_quant.default:
            return out
        x, scale, zero_point, qmin, qmax = args[:5]
        queue = self.probes.get(self.scale_names.get(scale.data_ptr()))
        if not queue or scale.numel() != 1:
            return out
        x_ort, codes_ort = (t.to(x.device) for t in queue.popleft())  # ORT's values are on the host
        if tuple(x_ort.shape) != tuple(x.shape):
            return out  # not the call this probe recorded (dynamic shapes): leave torch's value
        return resolve_codes(x, x_ort, codes_ort, scale.reshape(()), zero_point.reshape(()).to(x.dtype),
                             qmin, qmax, out, self.count)


def tie_resolved_outputs(qm: nn.Module, session, n_outputs: int, probes: Sequence[tuple[str, str, str]],
                         feeds: dict[str, Any], inputs: Sequence[Any],
                         kwargs: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray], TieCount]:
    """Run the probe session (its first ``n_outputs`` are the file's outputs) and the eval-mode
    model following ORT's ties. Returns (ORT's outputs, the model's tie-resolved outputs, counts)."""
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    values.update(feeds)
    queues: dict[str, deque] = defaultdict(deque)
    for scale_name, x_name, codes_name in probes:
        queues[scale_name].append((torch.from_numpy(np.asarray(values[x_name])),
                                   torch.from_numpy(np.asarray(values[codes_name]).astype(np.int32))))
    count = TieCount()
    with mode(qm, False), torch.no_grad(), _FollowOrtTies(activation_scale_names(qm), queues, count):
        outputs = [t.cpu().numpy() for t in tree_leaves(qm(*inputs, **kwargs)) if isinstance(t, Tensor)]
    return [values[n] for n in names[:n_outputs]], outputs, count
