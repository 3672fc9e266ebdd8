"""What the prepare pipeline's passes read besides the graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from qzo_fx.config import QuantConfig

__all__ = ["PrepareContext", "QUANT_CONTAINER", "ANNOTATION_KEY", "QUANTIZER_KEY"]

# The submodule of a prepared model that holds every Quantizer.
QUANT_CONTAINER = "qzo_quant"
# node.meta keys (namespaced so they never collide with torch's own).
ANNOTATION_KEY = "qzo.annotation"
QUANTIZER_KEY = "qzo.quantizer"


@dataclass
class PrepareContext:
    """``example_inputs`` / ``example_kwargs`` calibrate both modes unless ``mode_inputs`` gives
    each mode its own (a part of a partially captured model sees other inputs in each mode).
    ``quantizers`` names the quantizer of every quantized parameter and activation site, so the
    graphs of both modes share them (filled by insert_qdq)."""

    config: QuantConfig
    example_inputs: Optional[tuple[Any, ...]] = None
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    mode_inputs: Optional[dict[bool, tuple[tuple[Any, ...], dict[str, Any]]]] = None
    quantizers: dict[tuple, str] = field(default_factory=dict)
    # The user's modules by name: overrides keyed by module type match these (a torch.export
    # capture rebuilds the module tree out of plain nn.Modules).
    user_modules: dict[str, Any] = field(default_factory=dict)

    def inputs_for(self, training: bool) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The (args, kwargs) that calibrate the graph of ``training``; None without examples."""
        if self.mode_inputs is not None:
            return self.mode_inputs.get(training)
        return None if self.example_inputs is None else (tuple(self.example_inputs), dict(self.example_kwargs))
