"""A small training loop with a progress bar, and accuracy evaluation."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from qzo_fx.capture.modes import mode, set_mode
from qzo_fx.train.step import StepStats, train_step

__all__ = ["fit", "FitResult", "accuracy"]


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)
    seconds: float = 0.0


def fit(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Iterable[Any], *, estimator: Any = None,
        optimizer: Optional[torch.optim.Optimizer] = None, lr: float = 1e-3, strategy: str = "auto",
        total: Optional[int] = None, progress: bool = True, desc: str = "train") -> FitResult:
    """Train ``model`` on the batches of ``data`` with ``estimator`` (default STE) and AdamW.

    The progress bar shows the loss, the beta in force and the compute spent in forward-pass
    equivalents (fwd = 1, bwd = 2).

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(4, 2), qzo_fx.QuantConfig(weight_bits=2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        >>> ce = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> len(qzo_fx.fit(qm, ce, data, progress=False).losses)
        3
    """
    step = train_step(model, loss_fn, estimator, strategy=strategy)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    result, start = FitResult(stats=step.stats), time.perf_counter()
    set_mode(model, True)
    bar = tqdm(data, total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = float(step(batch))
        optimizer.step()
        result.losses.append(loss)
        postfix = {"loss": f"{loss:.3f}", "fwd-eq": step.stats.fwd_equivalents}
        if step.stats.beta is not None:
            postfix["beta"] = f"{step.stats.beta:.5f}"
        bar.set_postfix(postfix, refresh=False)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def accuracy(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode (the module's mode is restored afterwards)."""
    with (mode(model, False) if isinstance(model, nn.Module) else contextlib.nullcontext()):
        correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
    return correct / len(x)
