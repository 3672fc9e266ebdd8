"""The state of one quantizer: its spec, scale and zero point.

Graphs do not call this module: they read ``scale``/``zero_point`` with ``get_attr`` and call
``qzo.fake_quant`` / ``qzo.fake_sign`` directly, so printed code shows the op. The module
holds the state (so it lives in ``state_dict``) and offers a ``forward`` for module-level use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from qzo_fx.config import QuantSpec
from qzo_fx.context import QUANT_CONTAINER
from qzo_fx.quant import ops
from qzo_fx.quant.calibration import init_scale

__all__ = ["Quantizer", "QuantizerInfo", "quantizer_of", "quantizer_read"]


@dataclass(frozen=True)
class QuantizerInfo:
    """One row of :func:`qzo_fx.list_quantizers`."""

    name: str
    role: str          # "weight" or "activation"
    target: str        # the quantized parameter's name, or the node whose output is quantized
    bits: int
    granularity: str
    axis: Optional[int]
    scale_shape: tuple[int, ...]
    ste: str
    learned_scale: bool


class Quantizer(nn.Module):
    """Scale (parameter if learned, else buffer) and zero point of one quantized tensor."""

    def __init__(self, spec: QuantSpec, role: str, target: str, axis: int = 0, group_size: int = 0) -> None:
        super().__init__()
        self.spec, self.role, self.target = spec, role, target
        self.axis = axis if spec.granularity != "per_tensor" else -1
        self.group_size = group_size if spec.granularity == "per_group" else 0
        scale = torch.ones(())
        if spec.learns_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(()))
        # Persisted so a loaded state_dict is not re-initialised by calibration.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def initialize(self, x: Tensor, min_scale: Optional[Union[float, Tensor]] = None) -> None:
        """Set scale and zero point from ``x`` (weights: the latent tensor; activations: a sample),
        with no scale entry below ``min_scale`` when given (a number, or one per scale entry)."""
        floor = {} if min_scale is None else {"min_scale": min_scale}
        scale, zero = init_scale(x, self.spec, self.axis, self.group_size, name=self.target, **floor)
        with torch.no_grad():
            if isinstance(self.scale, nn.Parameter):
                self.scale = nn.Parameter(scale.to(self.scale.device))
            else:
                self.scale = scale.to(self.scale.device)
            self.zero_point = zero.to(self.zero_point.device)
            self.initialized.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Scales change shape at initialisation; adopt the stored shape before copying.
        for key in ("scale", "zero_point"):
            stored = state_dict.get(prefix + key)
            if stored is not None and stored.shape != getattr(self, key).shape:
                current = getattr(self, key)
                fresh = torch.zeros_like(stored, device=current.device)
                setattr(self, key, nn.Parameter(fresh) if isinstance(current, nn.Parameter) else fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_sign(self) -> bool:
        return self.spec.bits == 1

    def forward(self, x: Tensor) -> Tensor:
        if self.is_sign:
            return ops.fake_sign(x, self.scale, self.axis, self.group_size, self.spec.ste)
        qmin, qmax = self.spec.qrange
        return ops.fake_quant(x, self.scale, self.zero_point, qmin, qmax, self.axis, self.group_size, self.spec.ste)

    def step_size(self, like: Tensor) -> Tensor:
        """The quantization step in a shape that broadcasts against ``like`` (per-channel: a
        column, not a full tensor, so that eps-sized arithmetic stays cheap)."""
        return ops.expand_param(self.scale.detach(), like, self.axis, self.group_size)

    def info(self, name: str) -> QuantizerInfo:
        return QuantizerInfo(name, self.role, self.target, self.spec.bits, self.spec.granularity,
                             None if self.axis < 0 else self.axis, tuple(self.scale.shape),
                             self.spec.ste, self.spec.learns_scale)

    def extra_repr(self) -> str:
        return (f"role={self.role}, target={self.target}, bits={self.spec.bits}, "
                f"granularity={self.spec.granularity}, ste={self.spec.ste}")


def quantizer_read(gm: nn.Module, value) -> Optional[tuple[str, Quantizer, str]]:
    """``(name, quantizer, attribute)`` when ``value`` is a ``get_attr`` of ``qzo_quant.<name>.<attribute>``."""
    if getattr(value, "op", None) != "get_attr":
        return None
    container, _, rest = str(value.target).partition(".")
    name, _, attribute = rest.rpartition(".")
    if container != QUANT_CONTAINER or not name:
        return None
    return name, gm.get_submodule(container).get_submodule(name), attribute


def quantizer_of(gm: nn.Module, node) -> Optional[tuple[str, Quantizer]]:
    """``(name, quantizer)`` of a ``qzo.fake_quant``/``qzo.fake_sign`` node, read from the graph
    itself (the ``get_attr`` of its scale), so it holds after a save/load that drops node.meta."""
    if node.op != "call_function" or node.target not in (ops.FAKE_QUANT, ops.fake_sign._opoverload):
        return None
    found = quantizer_read(gm, node.args[1])
    return None if found is None else found[:2]
