"""train()/eval() that also accepts torch.export modules, whose mode is fixed at export time."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["set_mode", "mode", "mode_graph"]


def set_mode(module: nn.Module, training: bool) -> bool:
    """Set train/eval; returns False (and changes nothing) for a module that refuses it."""
    try:
        module.train(training)
        return True
    except NotImplementedError:  # torch.export's unlifted module: "Calling train() is not supported yet."
        return False


@contextlib.contextmanager
def mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily set train/eval, restoring the previous mode (exported modules stay as they are)."""
    previous = module.training
    set_mode(module, training)
    try:
        yield
    finally:
        set_mode(module, previous)


def mode_graph(module: nn.Module, training: bool) -> torch.fx.Graph:
    """The graph ``module`` runs in the given mode.

    A prepared model holds one graph per mode (``self.training`` branches, dropout and
    BatchNorm are captured as they run in each); this returns the one for ``training`` without
    switching the model. A plain GraphModule has one graph for both.
    """
    graphs = getattr(module, "qzo_mode_graphs", None)
    return graphs[training] if graphs is not None else module.graph
