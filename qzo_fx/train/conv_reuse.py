"""Branches that reuse the base pass: a first convolution and its channel-wise chain.

A *first convolution* reads an input that depends on no perturbed parameter (a CNN's stem).
What follows it channel by channel -- BatchNorm, element-wise activations -- keeps output
channel c a function of channel c alone. A branch's perturbed quantized weight differs from the
base pass's in a few output channels at most (often none: FOGZO's steps are small and a stem has
few weights), so for the chain ``act(bn(conv(x, Q(theta + delta))))``

* no channel changed: the base pass's output, as it is;
* a few changed: the base output with those channels computed again (conv on their weights
  only, then the chain on those channels, with their slice of every per-channel parameter);
* many, or an input that is not the base pass's: the whole chain.

A stem is expensive for its size (a one-channel 3x3 convolution over 28x28 images took 40% of
the reference CNN's forward), so skipping it is most of what a branch can save there.
``BaseTaps`` keeps ``x``, ``Q(theta)`` and the chain's output; ``IncrementalConv`` (in the
sequential branch graph) replaces the chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qzo_fx.train.base_reuse import FirstLayerReuse

__all__ = ["ConvChain", "IncrementalConv", "INCREMENTAL_CONV", "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS",
           "norm_step", "module_step", "function_step"]

INCREMENTAL_CONV = "qzo_incremental_conv"  # submodule name in the sequential branch graph

# Applied to each element alone, no state and no randomness: a slice of channels gives the
# slice of the result. (Dropout is left out: a slice would draw another mask.)
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                       nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity)
ELEMENTWISE_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish,
                         F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh)

# A step of the chain: (values of some channels, which channels or None for all) -> values.
Step = Callable[[Tensor, Optional[Tensor]], Tensor]


def norm_step(norm: nn.modules.batchnorm._BatchNorm) -> Step:
    """A BatchNorm module as branches run it: batch statistics in training mode (its running
    statistics frozen), the running ones in eval mode; per-channel parameters sliced."""
    def step(y: Tensor, channels: Optional[Tensor]) -> Tensor:
        pick = (lambda t: t) if channels is None else (lambda t: None if t is None else t.index_select(0, channels))
        if norm.training or norm.running_mean is None:
            return F.batch_norm(y, None, None, pick(norm.weight), pick(norm.bias), True, 0.0, norm.eps)
        return F.batch_norm(y, pick(norm.running_mean), pick(norm.running_var), pick(norm.weight),
                            pick(norm.bias), False, 0.0, norm.eps)
    return step


def module_step(module: nn.Module) -> Step:
    return lambda y, channels: module(y)


def function_step(fn: Callable, args: Sequence, kwargs: dict) -> Step:
    """``fn(y, *args, **kwargs)``, the other arguments constants."""
    return lambda y, channels: fn(y, *args, **kwargs)


@dataclass(frozen=True)
class ConvChain:
    """A first convolution's arguments and the channel-wise steps after it."""

    stride: Union[int, tuple]
    padding: Union[int, tuple, str]
    dilation: Union[int, tuple]
    steps: tuple[Step, ...]

    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], channels: Optional[Tensor] = None) -> Tensor:
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        for step in self.steps:
            y = step(y, channels)
        return y


class IncrementalConv(FirstLayerReuse):
    """``chain(conv2d(x, weight, bias))`` from the base pass's output and the changed channels."""

    def __init__(self, taps, chains: dict[str, ConvChain]) -> None:
        super().__init__(taps)
        self.chains = chains

    def room(self, numel: int) -> int:
        return numel  # any list: the share of changed channels decides

    def forward(self, key: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        self.calls += 1
        chain = self.chains[key]
        base = self._reusable(key, x, weight)
        where = None if base is None else self._changes(key, weight, base)
        if where is None:
            return chain(x, weight, bias)
        channels = torch.unique_consecutive(torch.div(where, weight[0].numel(), rounding_mode="floor"))
        if 2 * channels.numel() > weight.shape[0]:
            return chain(x, weight, bias)
        self.incremental_calls += 1
        if channels.numel() == 0:
            return base.out  # a later in-place write would show in its version: see above
        part = chain(x, weight.index_select(0, channels), None if bias is None else bias.index_select(0, channels),
                     channels)
        return base.out.index_copy(1, channels, part)
