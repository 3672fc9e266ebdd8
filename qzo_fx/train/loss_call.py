"""The user's ``loss_fn``, called as ``loss_fn(model, batch)`` with the mistakes named.

A torch loss takes ``(output, target)``; ``train_step`` needs the model and the batch, because
perturbation branches run the model themselves. Passing ``nn.CrossEntropyLoss()`` (or any
function of ``(output, target)``) is the common first mistake, and it fails deep inside torch
with "argument 'input' must be Tensor, not GraphModule". A loss module or a
``torch.nn.functional`` loss is refused when the step is built; a ``TypeError`` from any other
``loss_fn`` is re-raised as a :class:`TrainStepError` that shows the calling convention.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from torch import Tensor

from qzo_fx.errors import QzoError, TrainStepError

__all__ = ["checked_loss", "CONVENTION"]

CONVENTION = ("train_step calls loss_fn(model, batch): the model first, then the batch as your DataLoader "
              "yields it. Wrap a loss of (output, target), such as nn.CrossEntropyLoss(), in a function: "
              "lambda m, b: loss(m(b[0]), b[1]).")


def checked_loss(loss_fn: Any) -> Callable[[Any, Any], Tensor]:
    """``loss_fn`` for :class:`~qzo_fx.train.step.TrainStep`, refused when it cannot take
    ``(model, batch)``."""
    if not callable(loss_fn):
        raise TrainStepError(f"loss_fn must be callable, got {type(loss_fn).__name__}. {CONVENTION}")
    if isinstance(loss_fn, nn.modules.loss._Loss) or getattr(loss_fn, "__module__", "") == "torch.nn.functional":
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TrainStepError(f"loss_fn is torch's {name}, which takes (output, target). {CONVENTION}")

    def call(model: Any, batch: Any) -> Tensor:
        try:
            return loss_fn(model, batch)
        except QzoError:
            raise
        except TypeError as error:
            raise TrainStepError(f"loss_fn(model, batch) raised TypeError: {error}. {CONVENTION}") from error

    return call
