"""Sequential branches that reuse the base pass: a first convolution and its channel-wise chain.

A *first convolution* reads an input that depends on no perturbed parameter (a CNN's stem). What
follows it channel by channel -- BatchNorm, element-wise activations, max pooling -- keeps output
channel c a function of channel c alone. A branch's quantized weight differs from the base
pass's ``Q(theta)`` in a few output channels at most (often none: early in FOGZO's schedule the
steps are small), so for the chain ``pool(act(bn(conv(x, Q(theta + delta)))))``

* no channel changed: the base pass's output;
* a few changed (at most half): the base output with those channels computed again;
* more, or an input that is not the base pass's: the whole chain.

The base graph keeps copies of ``x``, ``Q(theta)`` and the chain's output for the step
(:class:`BaseTaps`); the sequential branch graph calls :class:`IncrementalConv` instead of the
chain. Which channels changed is a host decision, so this runs on CPU models only. A channel
computed again is a convolution over fewer output channels: equal to the dense one up to float
summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BaseTaps", "ConvChain", "IncrementalConv", "CHANNELWISE_MODULES", "CHANNELWISE_FUNCTIONS", "TAPS",
           "INCREMENTAL_CONV", "norm_step", "module_step", "function_step"]

TAPS = "qzo_base_taps"                     # submodule of the base graph
INCREMENTAL_CONV = "qzo_incremental_conv"  # submodule of the sequential branch graph

# Each output channel from its input channel alone, no state, no randomness: a slice of
# channels gives the slice of the result. (Dropout is left out: a slice would draw another mask.)
CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                       nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity, nn.MaxPool2d)
CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish,
                         F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.max_pool2d)

Step = Callable[[Tensor, Optional[Tensor]], Tensor]  # (some channels' values, which channels or None) -> values


def norm_step(norm: nn.modules.batchnorm._BatchNorm) -> Step:
    """A BatchNorm as branches run it: batch statistics in training mode (running statistics
    untouched), the running ones in eval mode; per-channel parameters sliced to the channels."""
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


@dataclass(frozen=True)
class _Base:
    x: Tensor       # the chain's input in the base pass
    weight: Tensor  # Q(theta)
    out: Tensor     # the chain's output


class BaseTaps(nn.Module):
    """Identity on a first chain's output that keeps copies of what branches reuse, per step."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, _Base] = {}

    def clear(self) -> None:
        self.values.clear()

    def forward(self, key: str, x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
        # Copies: the model may write into its input or the chain's output later in the pass.
        self.values[key] = _Base(x.detach().clone(), weight.detach().clone(), out.detach().clone())
        return out


class IncrementalConv(nn.Module):
    """``chain(conv2d(x, weight, bias))`` from the base pass's output and the changed channels."""

    def __init__(self, taps: BaseTaps, chains: dict[str, ConvChain]) -> None:
        super().__init__()
        self.taps = [taps]  # a list: not registered as a child (it belongs to the base graph)
        self.chains = chains
        self.calls = self.reused = 0

    def forward(self, key: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        self.calls += 1
        chain, base = self.chains[key], self.taps[0].values.get(key)
        if (base is None or x.device.type != "cpu" or x.shape != base.x.shape or weight.shape != base.weight.shape
                or not torch.equal(x, base.x)):
            return chain(x, weight, bias)
        channels = (weight != base.weight).flatten(1).any(1).nonzero().flatten()
        if 2 * channels.numel() > weight.shape[0]:
            return chain(x, weight, bias)
        self.reused += 1
        out = base.out.clone()  # the branch graph may write into it; the next branch needs it whole
        if channels.numel():
            part = chain(x, weight.index_select(0, channels),
                         None if bias is None else bias.index_select(0, channels), channels)
            out.index_copy_(1, channels, part)
        return out
