"""What a zeroth-order step perturbs: the parameter set and its smoothing rows, or the
integer-code buffers that ZOQO moves on the grid."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.errors import TrainStepError
from qzo_fx.quant import ops
from qzo_fx.quant.quantizer import Quantizer
from qzo_fx.train import sharding

__all__ = ["EPS_BAR", "NOISE_LAW", "smoothing_of", "PerturbedParam", "perturbed_params", "code_tensors"]

# eps_bar and unit-variance noise law of each STE: the STE is the exact gradient of the
# quantizer smoothed by eps_bar * u, u ~ law (units of one quantization step; algorithms.md).
EPS_BAR = {
    "round": 1.0 / (2.0 * math.sqrt(3.0)),
    "hardtanh": 1.0 / math.sqrt(3.0),
    "tanh": math.pi / math.sqrt(12.0),
    "approxsign": 1.0 / math.sqrt(6.0),
}
NOISE_LAW = {"round": "uniform", "hardtanh": "uniform", "tanh": "logistic", "approxsign": "triangular"}


def smoothing_of(ste: str, bits: int) -> str:
    """Which row of the STE table a quantizer uses: ``round`` for b >= 2, else its sign surrogate."""
    if bits >= 2:
        return "round"
    # Identity, clipped and LSQ on sign() all pass the gradient within one step: hardtanh's row.
    return ste if ste in ("tanh", "approxsign") else "hardtanh"


@dataclass(frozen=True)
class PerturbedParam:
    """A parameter in the perturbed set with its smoothing row (eps_bar, noise law)."""

    name: str
    quantizer: Optional[Quantizer]   # None: a float parameter (perturb="all")
    eps_bar: float
    law: str

    def eps(self, param: Tensor, eps_float: float) -> Tensor:
        """Per-coordinate perturbation size, in a shape that broadcasts against ``param``."""
        if self.quantizer is None:
            return torch.full((), eps_float, dtype=param.dtype, device=param.device)  # a fill: no host copy
        q = self.quantizer
        if sharding.is_dtensor(q.scale):  # a learned scale sharded by FSDP2: the whole scale (a small all-gather)
            return ops.expand_param(q.scale.detach().full_tensor(), param, q.axis, q.group_size) * self.eps_bar
        return q.step_size(param) * self.eps_bar


def perturbed_params(model: nn.Module, perturb: str) -> list[PerturbedParam]:
    """Latent weights feeding quantizers (one entry per shared parameter), plus every other
    trainable parameter except quantizer scales when ``perturb == "all"``."""
    chosen: dict[int, PerturbedParam] = {}
    for prefix, container in quantizer_containers(model):  # the root, or the parts of a partial model
        for quantizer in container.children():
            if isinstance(quantizer, Quantizer) and quantizer.role == "weight":
                name = f"{prefix}.{quantizer.target}" if prefix else quantizer.target
                try:
                    param = model.get_parameter(name)
                except AttributeError as error:  # to_integer_codes replaced the latent weights by codes
                    raise TrainStepError(f"'{name}' is held as integer codes (to_integer_codes): train it with "
                                         "qzo_fx.ZOQO(...), or call qzo_fx.to_latent_weights(model) first.") from error
                row = smoothing_of(quantizer.spec.ste, quantizer.spec.bits)
                chosen.setdefault(id(param), PerturbedParam(name, quantizer, EPS_BAR[row], NOISE_LAW[row]))
    if perturb == "all":
        for name, param in model.named_parameters():
            if param.requires_grad and not name.startswith(QUANT_CONTAINER + ".") and id(param) not in chosen:
                chosen[id(param)] = PerturbedParam(name, None, 1.0, "gaussian")
    return [p for p in chosen.values() if model.get_parameter(p.name).requires_grad]


def code_tensors(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """``(buffer name, quantizer)`` of every integer-code weight of a model in code mode."""
    container = getattr(model, QUANT_CONTAINER, None)
    found = [(f"{QUANT_CONTAINER}.{name}.codes", q) for name, q in (container.named_children() if container else ())
             if isinstance(q, Quantizer) and hasattr(q, "codes")]
    if not found:
        raise TrainStepError("ZOQO trains integer codes: switch the prepared model first with "
                             "qm = qzo_fx.to_integer_codes(qm).")
    return found
