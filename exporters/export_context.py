"""Names shared by the export passes."""
from __future__ import annotations

import torch.nn as nn

__all__ = ["EXPORT_CONTAINER", "PACKABLE_KEY", "export_container"]

# Submodule of a lowered model holding integer codes, scales and typed zero points.
EXPORT_CONTAINER = "qzo_export"
# gm.meta key: {buffer prefix: (bits, signed)} of weights that may be stored below 8 bits.
PACKABLE_KEY = "qzo.export.packable"


def export_container(gm: nn.Module) -> nn.Module:
    """The lowered model's holder of integer codes, scales and zero points (created on first use)."""
    if not hasattr(gm, EXPORT_CONTAINER):
        gm.add_submodule(EXPORT_CONTAINER, nn.Module())
    return getattr(gm, EXPORT_CONTAINER)
