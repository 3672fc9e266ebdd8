"""Hugging Face models under torch.export: the library's own export helpers, where it has them.

transformers (5.2x) ships what torch.export needs for its models: pytree registrations for its
cache classes (so a model that returns a ``DynamicCache`` exports and keeps returning it) and
reversible patches of patterns torch.export cannot follow. Capture registers the pytrees for
every ``PreTrainedModel`` and applies the patches only when the model does not export without
them: they are export-safe, not always the same computation (a sliding-window cache keeps only
its window). With an older transformers, or for other models, nothing changes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ["export_helpers", "is_hf_model"]


def is_hf_model(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
               for cls in type(model).__mro__)


@contextlib.contextmanager
def export_helpers(model: nn.Module, patched: bool = False) -> Iterator[None]:
    """Cache pytrees registered (and, if ``patched``, transformers' export patches applied) while
    ``model`` is exported."""
    if not is_hf_model(model):
        yield
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model, reset_model_state
        from transformers.exporters.utils import apply_patches
    except ImportError:  # a transformers without its exporters package
        yield
        return
    register_cache_pytrees_for_model(model)
    with apply_patches("dynamo") if patched else contextlib.nullcontext(), reset_model_state(model):
        yield
