"""Loading a checkpoint without quantizer state into a prepared model.

A float checkpoint (``qm.load_state_dict(float_model.state_dict(), strict=False)``) brings new
weights but no scales: the ones prepare computed fit the weights it saw. Each weight quantizer
whose weight the checkpoint holds is initialised again from the loaded weight. Activation scales
cannot be recomputed without data; a warning says so and names the way to calibrate them on the
new weights (prepare the model after loading the checkpoint into it).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch.nn as nn

from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["quantizers_left_unloaded", "initialize_unloaded"]


def quantizers_left_unloaded(module: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> list[str]:
    """Names of ``module``'s quantizers whose scale the checkpoint does not hold, while it holds
    the weight a weight quantizer reads or any weight at all (an activation quantizer)."""
    container = getattr(module, QUANT_CONTAINER, None)
    if container is None:
        return []
    loads_weights = any(key.startswith(prefix) and not key.startswith(f"{prefix}{QUANT_CONTAINER}.")
                        for key in state_dict)
    names = []
    for name, q in container.named_children():
        if not isinstance(q, Quantizer) or f"{prefix}{QUANT_CONTAINER}.{name}.scale" in state_dict:
            continue
        if (q.role == "weight" and f"{prefix}{q.target}" in state_dict) or (q.role == "activation" and loads_weights):
            names.append(name)
    return names


def initialize_unloaded(module: nn.Module, names: list[str]) -> None:
    """Initialise weight quantizers again from the loaded weights; warn about activation scales."""
    container = getattr(module, QUANT_CONTAINER)
    stale = []
    for name in names:
        q = getattr(container, name)
        if q.role == "weight":
            q.initialize(module.get_parameter(q.target).detach())
        else:
            stale.append(name)
    if stale:
        shown = ", ".join(stale[:4]) + (" ..." if len(stale) > 4 else "")
        warnings.warn(f"the checkpoint loaded into {type(module).__name__} holds weights but no activation scales; "
                      f"{len(stale)} activation quantizer(s) keep the scales prepare() calibrated on the old weights "
                      f"({shown}). Weight scales were set from the loaded weights. To calibrate the activations too, "
                      "load the checkpoint into the float model and prepare that.", UserWarning, stacklevel=4)
