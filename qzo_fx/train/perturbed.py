"""What a zeroth-order step perturbs: the parameter set and its smoothing rows, or the
integer-code buffers that ZOQO moves on the grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.train import zo_math
from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.errors import TrainStepError
from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["PerturbedParam", "perturbed_params", "code_tensors"]


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
            return torch.tensor(eps_float, dtype=param.dtype, device=param.device)
        return self.quantizer.step_size(param) * self.eps_bar


def perturbed_params(model: nn.Module, perturb: str) -> list[PerturbedParam]:
    """Latent weights feeding quantizers (one entry per shared parameter), plus every other
    trainable parameter except quantizer scales when ``perturb == "all"``."""
    chosen: dict[int, PerturbedParam] = {}
    for prefix, container in quantizer_containers(model):  # the root, or the parts of a partial model
        for quantizer in container.children():
            if isinstance(quantizer, Quantizer) and quantizer.role == "weight":
                name = f"{prefix}.{quantizer.target}" if prefix else quantizer.target
                param = model.get_parameter(name)
                row = zo_math.smoothing_of(quantizer.spec.ste, quantizer.spec.bits)
                chosen.setdefault(id(param), PerturbedParam(name, quantizer, zo_math.EPS_BAR[row],
                                                            zo_math.NOISE_LAW[row]))
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
