"""What a train step needs from torch.distributed, and nothing when it is not initialised.

Every rank must write the same estimate: the per-step seed (hence s and u) is rank 0's, the STE
gradient is DDP's all-reduced one, and branch losses are averaged over ranks before differencing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = ["unwrap", "active", "all_reduce_mean", "broadcast_int"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (else the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(values: Tensor) -> Tensor:
    """Mean over ranks (identity without a process group)."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.div_(dist.get_world_size())


def broadcast_int(value: int) -> int:
    """Rank 0's value on every rank."""
    if not active():
        return value
    box = torch.tensor([value], dtype=torch.long)
    dist.broadcast(box, src=0)
    return int(box.item())
