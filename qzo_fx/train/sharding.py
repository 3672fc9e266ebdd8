"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the perturbed tensors as this rank's shards.

A sharded parameter is a DTensor; this rank holds rows ``row .. row + rows`` of it (``Shard(0)``,
FSDP2's default placement), values ``start .. start + numel`` of the flattened tensor. The step
then works on those local rows alone:

* the perturbation: values ``start ..`` of the tensor's one noise stream, which every rank
  shares (the chunked streams of :mod:`qzo_fx.train.noise` draw a slice on its own);
* eps per output channel or group: the same rows of the whole tensor's eps;
* ``||eps * g||``: squared local norms summed over the ranks that hold the shards;
* the branches: the local shards perturbed in place and the model run through its FSDP hooks
  (they all-gather the perturbed shards), then every FSDP module resharded -- FSDP keeps the
  root's gathered parameters after a forward that no backward follows, and the next branch
  must gather again;
* the estimate: this rank's rows of G into the local tensor of the DTensor ``.grad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, cast

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.fx import GraphModule

from qzo_fx.capture.modes import mode_graph
from qzo_fx.errors import TrainStepError

__all__ = ["ShardSpan", "Shards", "check_model", "is_dtensor", "is_sharded", "local", "reshard", "strategy_for",
           "sum_over_ranks"]

try:  # FSDP2 and DTensor ship with torch.distributed; a build without it has nothing sharded
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch built without distributed
    FSDPModule = DTensor = Replicate = Shard = None  # type: ignore[assignment, misc]


def is_sharded(model: nn.Module) -> bool:
    """True if ``fully_shard`` was applied to ``model`` or one of its modules."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise), aliasing its storage."""
    if DTensor is not None and isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def reshard(model: nn.Module) -> None:
    """Every FSDP module back to its shards (frees the gathered parameters)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def strategy_for(strategy: str) -> str:
    """The branch strategy on a sharded model: the local shards perturbed in place, the model run
    through its FSDP hooks (``auto`` -> ``inplace``; ``lean`` draws directions per tensor)."""
    if strategy in ("sequential", "batched"):
        raise TrainStepError(f"strategy={strategy!r} cannot run on a model sharded with fully_shard: its branch "
                             "graph reads the parameters outside FSDP's hooks, where each rank holds only its "
                             "shard. Use 'inplace' (or 'auto', which picks it) or 'lean' (directions drawn per "
                             "tensor, less memory).")
    return "inplace" if strategy == "auto" else strategy


def sum_over_ranks(values: Tensor) -> Tensor:
    """Sum over all ranks (what a finiteness check needs: finite exactly when every part is)."""
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@dataclass(frozen=True)
class ShardSpan:
    """Where this rank's local tensor sits in the whole one (dim 0 rows, flattened values)."""

    row: int     # first row along dim 0
    rows: int    # rows held here
    start: int   # offset of the first value in the flattened tensor: its noise stream's offset
    total: int   # values in the whole tensor

    def rows_of(self, eps: Tensor, dim: int) -> Tensor:
        """``eps`` (broadcasting against the whole tensor, ``dim`` dimensions) cut to these rows:
        per-output-channel or per-group sizes along dim 0 are sliced, others broadcast as they are."""
        if eps.dim() == dim and dim > 0 and eps.shape[0] > 1:
            return eps.narrow(0, self.row, self.rows)
        return eps


def _span(name: str, param: Tensor) -> ShardSpan:
    if not isinstance(param, DTensor):
        raise TrainStepError(f"parameter {name!r} is not sharded while other parameters are (FSDP2): its STE "
                             "gradient would not be reduced over ranks. Apply fully_shard to the root module too "
                             "(fully_shard(model) after the submodules).")
    if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in param.placements):
        raise TrainStepError(f"parameter {name!r} is sharded as {tuple(param.placements)}: train_step draws a shard's "
                             "perturbation as one contiguous range of the tensor's noise stream, which needs rows "
                             "(Shard(0), fully_shard's default). Drop shard_placement_fn for this parameter.")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row = offset[0] if offset else 0
    rows = shape[0] if shape else 1
    per_row = param[0].numel() if param.dim() else 1
    return ShardSpan(row, rows, row * per_row, param.numel())


def check_model(model: nn.Module) -> None:
    """Every FSDP module one that runs and every trainable parameter sharded by rows (else a
    :class:`TrainStepError` naming it); the model resharded, so that its parameters are the DTensors."""
    _check_units(model)
    _check_precision(model)
    reshard(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            _span(name, param)


def _check_units(model: nn.Module) -> None:
    """FSDP gathers a unit's parameters when the unit is called. A prepared graph reads weights
    with ``get_attr`` (they feed ``qzo.fake_quant``) and calls few modules, so a unit the graph
    never calls keeps its parameters sharded in the forward."""
    if not isinstance(model, GraphModule):
        return
    called = {str(n.target) for training in (True, False) for n in mode_graph(model, training).nodes
              if n.op == "call_module"}
    idle = [name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)
            and not any(name == c or name.startswith(c + ".") for c in called)]
    if idle:
        raise TrainStepError(f"fully_shard was applied to {', '.join(map(repr, idle))}, which the prepared graph "
                             "never calls (it reads their weights directly, into qzo.fake_quant), so FSDP would "
                             "never gather their parameters. Shard the prepared model's root only: "
                             "fully_shard(qm).")


def _check_precision(model: nn.Module) -> None:
    """Mixed precision casts the gathered parameters but not the quantizers' scale buffers, and
    ``qzo.fake_quant`` returns its scale's dtype: a low-precision input would meet a float32
    weight in the next op (the forward fails, for the STE as for any estimator)."""
    for name, module in model.named_modules():
        state = module._get_fsdp_state() if isinstance(module, FSDPModule) else None
        dtype = getattr(getattr(state, "_mp_policy", None), "param_dtype", None)
        if dtype is not None and dtype != torch.float32:
            raise TrainStepError(f"fully_shard({name or 'model'!r}, mp_policy=MixedPrecisionPolicy(param_dtype="
                                 f"{dtype})) is not supported: the quantizers' scales stay float32 and "
                                 "qzo.fake_quant computes in their dtype, so the forward would mix dtypes. Shard "
                                 "without param_dtype.")


class Shards:
    """The perturbed parameters of a model sharded with ``fully_shard``, as this rank's parts.

    Args:
        model: the sharded model (resharded here, so that its parameters are the DTensors).
        names: the perturbed parameters' dotted names.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        reshard(model)
        self.model = model
        self.whole = [model.get_parameter(n) for n in names]
        self.spans = [_span(n, p) for n, p in zip(names, self.whole)]
        self.local = [local(p) for p in self.whole]
        # Squared norms are summed over the mesh dimensions that shard (not those that replicate).
        self._groups = [_shard_groups(p) for p in self.whole]

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """``(start, total)`` of each local tensor in its tensor's noise stream."""
        return [(s.start, s.total) for s in self.spans]

    @property
    def numel(self) -> int:
        """Coordinates of the whole perturbed set (every rank's shards)."""
        return sum(p.numel() for p in self.whole)

    def eps(self, eps: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor's eps cut to this rank's rows."""
        return [span.rows_of(e, p.dim()) for span, e, p in zip(self.spans, eps, self.whole)]

    def sum(self, values: Tensor) -> Tensor:
        """Per-tensor values (``[tensors]``, e.g. squared local norms) summed over each tensor's shards:
        one all-reduce per distinct group of ranks (one with a single FSDP mesh)."""
        out = values.clone()
        by_group: dict[tuple, list[int]] = {}
        for i, groups in enumerate(self._groups):
            by_group.setdefault(groups, []).append(i)
        for groups, indices in by_group.items():
            part = out[indices]
            for group in groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            out[indices] = part
        return out

    def gradients(self) -> list[Optional[Tensor]]:
        """The local parts of the parameters' ``.grad`` (FSDP's reduce-scattered STE gradient)."""
        return [None if p.grad is None else local(p.grad) for p in self.whole]

    def gradients_to_write(self) -> list[Tensor]:
        """The local parts of the parameters' ``.grad``, a zero DTensor gradient where one has none."""
        for p in self.whole:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [local(p.grad) for p in self.whole if p.grad is not None]


def _shard_groups(param: Tensor) -> tuple:
    dtensor = cast(DTensor, param)  # checked by _span
    mesh = dtensor.device_mesh
    return tuple(mesh.get_group(d) for d, p in enumerate(dtensor.placements) if isinstance(p, Shard))
