"""Rounding ties between PyTorch and ONNX Runtime, found quantizer by quantizer.

Two correct implementations of the same graph differ in the last bits: GEMM accumulation order,
LayerNorm, Erf and Softmax in float, and ONNX Runtime's fused integer kernels (QLinearConv,
QGemm, QLinearAveragePool), which sum exactly in int32 and requantize with a float multiplier.
Where a quantizer's input lands within that noise of a rounding boundary, torch and ORT pick
neighbouring codes: a *tie*, which neither side gets wrong. In a deep network one tied code can
grow into several output steps, and an output-only comparison then cannot tell it from an
export bug.

This module runs the file in the session users open (default options, so integer kernels
fused) with every activation QuantizeLinear's *codes* exposed -- only the codes: exposing the
float input of a QuantizeLinear would stop the fusion that computes it -- then runs the
eval-mode model with each activation quantizer compared against ORT's codes as it goes. A
differing code is a tie when it is the neighbour of torch's code and torch's own input lies
within float precision (``RTOL`` of the tensor's range, 1/4000 of a step at 8 bits) of the
boundary between the two; ties take ORT's code, so the rest of the model sees what ORT saw.
Any other differing code is *unexplained*: a real disagreement (wrong scale, zero point or op,
a saturating kernel), left as torch computed it, reported, and a parity failure.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qzo_fx.capture.modes import mode
from qzo_fx.passes.prepare.quantize_bias import BIAS_QRANGE

__all__ = ["TieCount", "probe_model", "quantizer_key", "tie_resolved_outputs", "resolve_codes"]

# Inputs closer than this fraction of the tensor's range agree "to float precision": 16 float32
# roundings (2^-24 each) of the range, room for the few float ops between two quantizers (the
# requantizing multiply, a bias or residual add, a LayerNorm or Softmax). The widest tie measured
# over the parity tests and 20 zoo models sat at 2.4e-7 of the range. A systematic deviation (a
# runtime rounding a bias once more shifts every input by up to half an accumulator step, 1e-5 of
# the range on the resnets) flips codes farther from the boundary: those are reported, not followed.
RTOL = 2.0**-20


@dataclass
class TieCount:
    codes: int = 0          # activation codes compared
    ties: int = 0           # neighbouring codes with torch's input at the boundary (ORT's taken)
    unexplained: int = 0    # any other differing code: a real disagreement


def quantizer_key(scale: Any, zero_point: Any) -> tuple[bytes, int]:
    """What identifies an activation quantizer on both sides: its float32 scale and its zero
    point (names do not serve: the ONNX optimizer merges equal scale initializers)."""
    step = np.float32(np.asarray(scale, dtype=np.float32).reshape(()))
    return step.tobytes(), int(np.asarray(zero_point).reshape(()))


def probe_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[tuple[bytes, int], str]]]:
    """A copy of ``model`` whose per-tensor QuantizeLinear codes are graph outputs.

    Every QuantizeLinear of an exported file quantizes an activation (weights and biases are
    stored as integers). Returns the copy and, in node order, ``(quantizer key, codes name)``."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    graph, probes = probed.graph, []
    constants = {init.name: init for init in graph.initializer}
    exposed = {o.name for o in graph.output} | {i.name for i in graph.input}
    # Below 8 bits a Clip follows the QuantizeLinear (QCDQ): the codes are the Clip's output.
    clipped = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Clip"}
    for node in graph.node:
        quantizes = node.op_type == "QuantizeLinear" and len(node.input) >= 3
        if not quantizes or not {node.input[1], node.input[2]} <= set(constants):
            continue
        scale, zero = (numpy_helper.to_array(constants[n]) for n in node.input[1:3])
        if scale.size != 1:
            continue
        codes = clipped.get(node.output[0], node.output[0])
        probes.append((quantizer_key(scale, zero), codes))
        if codes not in exposed:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(codes))
            exposed.add(codes)
    return probed, probes


def resolve_codes(x_torch: Tensor, codes_ort: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  out: Tensor, count: TieCount) -> Tensor:
    """``out`` (torch's fake-quant of ``x_torch``, per tensor) with ties set to ORT's codes.

    A tie: ORT's code is the neighbour of torch's, and torch's input lies within ``RTOL`` of the
    tensor's range (in steps) of the rounding boundary between the two codes."""
    steps = torch.div(x_torch, scale)
    codes_torch = steps.round().add(zero_point).clamp(qmin, qmax)
    codes_ort = codes_ort.to(codes_torch.dtype)
    differ = codes_torch != codes_ort
    boundary = torch.minimum(codes_torch, codes_ort) - zero_point + 0.5
    tolerance = RTOL * max(float(steps.abs().max()), 1.0)
    ties = differ & ((codes_torch - codes_ort).abs() == 1) & ((steps - boundary).abs() <= tolerance)
    count.codes += codes_torch.numel()
    count.ties += int(ties.sum())
    count.unexplained += int((differ & ~ties).sum())
    return torch.where(ties, codes_ort.sub(zero_point).mul(scale), out)


# How many of ORT's pending probes with a call's scale, zero point and shape are compared with it,
# and how many of its codes may differ for a probe to count as this call's (ties are a few codes;
# another tensor's codes differ in a large share).
_WINDOW = 16
_MATCH_FRACTION = 0.01


def _closest_probe(queue: deque, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Optional[int]:
    """The index in ``queue`` of this call's probe: among the first ``_WINDOW`` of ``x``'s shape,
    the earliest whose codes differ from torch's codes of ``x`` in the fewest places, when those
    are few (None otherwise: ORT does not run this call's quantizer, and a probe no call takes is
    counted as unexplained at the end). Many quantizers share a scale and zero point (on a scale
    grid most do), so the codes themselves tell them apart."""
    shaped = [i for i, codes in enumerate(queue) if tuple(codes.shape) == tuple(x.shape)][:_WINDOW]
    if not shaped:
        return None
    codes_torch = torch.div(x, scale).round().add(zero_point).clamp(qmin, qmax).cpu()
    differ = {i: int((queue[i].to(codes_torch.dtype) != codes_torch).sum()) for i in shaped}
    best = min(shaped, key=lambda i: differ[i])
    return best if differ[best] <= max(8, _MATCH_FRACTION * x.numel()) else None


class _FollowOrtTies(TorchDispatchMode):
    """Dispatch mode: each per-tensor ``qzo.fake_quant`` call is checked against ORT's probe of a
    quantizer with the same scale and zero point and the call's shape (the closest in codes where
    several are pending)."""

    def __init__(self, probes: dict[tuple[bytes, int], deque], count: TieCount) -> None:
        super().__init__()
        self.probes, self.count = probes, count
        # Inputs already matched, per key, with ORT's codes: a quantizer called again on the same
        # tensor (a LayerNorm output before q, k and v) is one QuantizeLinear in the file.
        self.matched: dict[tuple[bytes, int], list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is not torch.ops.qzo.fake_quant.default or tuple(args[3:5]) == BIAS_QRANGE:
            return out
        x, scale, zero_point, qmin, qmax = args[:5]
        if scale.numel() != 1:
            return out
        key = quantizer_key(scale.detach().cpu().numpy(), zero_point.detach().cpu().numpy())
        scale, zero_point = scale.reshape(()), zero_point.reshape(()).to(x.dtype)
        queue = self.probes.get(key)
        index = None if not queue else _closest_probe(queue, x, scale, zero_point, qmin, qmax)
        if index is None:
            for seen, codes_ort in self.matched[key]:  # one QuantizeLinear for several calls
                if seen.shape == x.shape and torch.equal(seen, x):
                    return resolve_codes(x, codes_ort, scale, zero_point, qmin, qmax, out, TieCount())  # counted once
            return out  # no probe of this call (a weight, or a quantizer ORT does not run)
        codes_ort = queue[index].to(x.device)  # ORT's values are on the host
        del queue[index]
        self.matched[key].append((x.clone(), codes_ort))  # a copy: in-place ops change x later
        return resolve_codes(x, codes_ort, scale, zero_point, qmin, qmax, out, self.count)


def tie_resolved_outputs(qm: nn.Module, probe_session, probes: Sequence[tuple[tuple[bytes, int], str]],
                         feeds: dict[str, Any], inputs: Sequence[Any],
                         kwargs: dict[str, Any]) -> tuple[list[np.ndarray], TieCount]:
    """Run the probe session and the eval-mode model following ORT's ties.
    Returns (the model's tie-resolved outputs, counts)."""
    names = [o.name for o in probe_session.get_outputs()]
    values = dict(zip(names, probe_session.run(None, feeds)))
    queues: dict[tuple[bytes, int], deque] = defaultdict(deque)
    for key, codes_name in probes:
        queues[key].append(torch.from_numpy(np.asarray(values[codes_name]).astype(np.int32)))
    count = TieCount()
    with mode(qm, False), torch.no_grad(), _FollowOrtTies(queues, count):
        outputs = [t.cpu().numpy() for t in tree_leaves(qm(*inputs, **kwargs)) if isinstance(t, Tensor)]
    # A QuantizeLinear that no quantizer of the model matched (another scale or zero point than
    # any the model has, or one more than it calls): the file quantizes what the model does not.
    count.unexplained += sum(codes.numel() for queue in queues.values() for codes in queue)
    return outputs, count
