"""Names shared by the export passes."""
from __future__ import annotations

__all__ = ["EXPORT_CONTAINER", "PACKABLE_KEY"]

# Submodule of a lowered model holding integer codes, scales and typed zero points.
EXPORT_CONTAINER = "qzo_export"
# gm.meta key: {buffer prefix: (bits, signed)} of weights that may be stored below 8 bits.
PACKABLE_KEY = "qzo.export.packable"
