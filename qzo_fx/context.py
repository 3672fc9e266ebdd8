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
    config: QuantConfig
    example_inputs: Optional[tuple[Any, ...]] = None
    example_kwargs: dict[str, Any] = field(default_factory=dict)
