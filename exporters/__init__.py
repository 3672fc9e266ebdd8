"""ONNX lowering, emitters and verification; installed as ``qzo_fx.exporters``.

``export_causal_lm`` (a decoder LM with a KV cache) and ``generate`` (greedy decoding in ONNX
Runtime) load on first use, like the rest of the export names of :mod:`qzo_fx`.
"""
from __future__ import annotations

_LAZY = {"export_causal_lm": "qzo_fx.exporters.causal_lm", "generate": "qzo_fx.exporters.generation",
         "Generation": "qzo_fx.exporters.generation", "write_genai_config": "qzo_fx.exporters.genai"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qzo_fx.exporters' has no attribute {name!r}")
