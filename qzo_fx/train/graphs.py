"""The graphs the branches run, built by one list of named passes from the model's graph.

Each graph is a copy of the graph the model runs in the current mode
(:func:`qzo_fx.capture.modes.mode_graph`: the training graph while training), sharing every
parameter, buffer and quantizer with the model. The passes read the strategy from the context
and leave alone what is not theirs (``modified=False``), so each graph's history in
``gm.meta["qzo.passes"]`` shows the same pipeline.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.capture.modes import mode_graph
from qzo_fx.pass_infra import Pass, PassManager
from qzo_fx.passes.train.branch_context import KINDS, BranchContext
from qzo_fx.passes.train.freeze_norm_stats import freeze_norm_stats
from qzo_fx.passes.train.hoist_weight_qdq import hoist_weight_qdq
from qzo_fx.passes.train.incremental_conv import incremental_conv
from qzo_fx.passes.train.lift_params import lift_params
from qzo_fx.passes.train.lower_qdq import lower_qdq
from qzo_fx.passes.train.stream_perturbations import PERTURBER, stream_perturbations
from qzo_fx.passes.train.tap_base import tap_base
from qzo_fx.train.reuse import BaseTaps
from qzo_fx.train.strategies.lean import Perturber

__all__ = ["BRANCH_PIPELINE", "BranchGraphs", "branch_graph"]

BRANCH_PIPELINE = (
    Pass("tap_base", tap_base, "base pass: each first convolution chain keeps x, Q(theta) and its output for the "
         "step's sequential branches"),
    Pass("lift_params", lift_params, "perturbed parameters become leading inputs theta_<name>: one value per "
         "branch, or K stacked under vmap (not for lean)"),
    Pass("stream_perturbations", stream_perturbations, "lean: every perturbed read goes through qzo_perturber, so "
         "a perturbed copy exists one layer at a time"),
    Pass("lower_qdq", lower_qdq, "branches never differentiate: q/dq kernels without the op's autograd wrapper"),
    Pass("freeze_norm_stats", freeze_norm_stats, "functional training-mode batch norms (torch.export graphs): "
         "batch statistics, no running update"),
    Pass("incremental_conv", incremental_conv, "sequential: a first convolution chain from the base pass's "
         "output, only the channels whose code moved computed again"),
    Pass("hoist_weight_qdq", hoist_weight_qdq, "sequential: weights perturbed and quantized in one prologue "
         "before the graph, not one q/dq kernel each"),
)


def branch_graph(model: nn.Module, names: Sequence[str], kind: str = "lifted", training: bool = True,
                 taps: Optional[BaseTaps] = None) -> GraphModule:
    """The graph of ``kind`` (see :class:`~qzo_fx.passes.train.branch_context.BranchContext`)."""
    gm = GraphModule(model, copy.deepcopy(mode_graph(model, training)), class_name=f"{kind.capitalize()}Graph")
    if kind == "streamed":
        gm.add_submodule(PERTURBER, Perturber())
    return PassManager(BRANCH_PIPELINE).run(gm, BranchContext(tuple(names), kind, taps)).graph_module


class BranchGraphs:
    """The graphs of one model's step, built on first use, one per kind and mode. With ``taps``
    (FOGZO on a CPU model, no DDP wrapper) the base pass runs the "base" graph and sequential
    branches reuse its first convolutions."""

    def __init__(self, model: nn.Module, names: Sequence[str], taps: Optional[BaseTaps] = None) -> None:
        self.model, self.names, self.taps = model, tuple(names), taps
        self._graphs: dict[tuple[str, bool], GraphModule] = {}

    def get(self, kind: str) -> GraphModule:
        if kind not in KINDS:
            raise ValueError(f"unknown branch graph kind {kind!r}")
        key = (kind, self.model.training)
        if key not in self._graphs:
            self._graphs[key] = branch_graph(self.model, self.names, kind, self.model.training, self.taps)
        return self._graphs[key]

    def getter(self, kind: str):
        """A callable giving the graph of ``kind`` for the model's mode at the time of the call."""
        return lambda: self.get(kind)
