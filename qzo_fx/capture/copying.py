"""Copies of users' models, also where a weight-normalization hook holds the weight it computed.

prepare, examine and export work on copies, so that nothing the user passed is changed.
``torch.nn.utils.weight_norm`` and ``torch.nn.utils.spectral_norm`` (the hook-based forms, still
the usual ones in research code: TCN, WaveNet, HiFi-GAN, GAN discriminators) store the weight they
compute as a plain attribute, a tensor that autograd made. ``copy.deepcopy`` refuses such a tensor
("Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"), so
such a model could not be prepared at all. The copy takes a detached clone of that attribute: the
hook computes the weight again from its parameters before each forward, in the copy as in the model.
"""
from __future__ import annotations

import copy
from typing import TypeVar

import torch.nn as nn
from torch import Tensor
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["copy_model"]

M = TypeVar("M", bound=nn.Module)


def copy_model(model: M) -> M:
    """``copy.deepcopy(model)``, with each hook-computed weight copied detached.

    Example:
        >>> import torch
        >>> conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(2, 4, 3))
        >>> copied = copy_model(conv)
        >>> torch.equal(copied(torch.ones(1, 2, 5)), conv(torch.ones(1, 2, 5)))
        True
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            computed = getattr(module, hook.name, None) if isinstance(hook, (WeightNorm, SpectralNorm)) else None
            if isinstance(computed, Tensor) and computed.grad_fn is not None:
                memo[id(computed)] = computed.detach().clone()
    return copy.deepcopy(model, memo)
