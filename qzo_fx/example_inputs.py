"""The positional example inputs every entry point takes, read one way.

A bare tensor is the common way to pass one input (``torch.onnx.export`` takes it so), but
``tuple(x)`` would split it along its first axis into one argument per batch row. So a tensor
is one argument; a tuple or list is the arguments; a mapping (a dict, a tokenizer's BatchEncoding)
is refused with the keyword to use.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from qzo_fx.errors import InputError

__all__ = ["positional_inputs"]


def positional_inputs(value: Any, where: str) -> Optional[tuple[Any, ...]]:
    """``value`` as a tuple of positional arguments for ``where`` (the calling function's name).

    Example:
        >>> x = torch.zeros(2, 3)
        >>> len(positional_inputs(x, "prepare")), len(positional_inputs((x, x), "prepare"))
        (1, 2)
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, Mapping):  # a dict, or a tokenizer's BatchEncoding (a Mapping, not a dict)
        raise InputError(f"{where} got a {type(value).__name__} as its positional example inputs; pass keyword "
                         f"inputs as example_kwargs=... (e.g. example_kwargs=tokenizer(texts, return_tensors='pt'), "
                         "for model(**batch)) and positional ones as a tuple.")
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise InputError(f"{where} takes its example inputs as a tuple of positional arguments (or one tensor); "
                     f"got {type(value).__name__}. Wrap a single input as (x,).")
