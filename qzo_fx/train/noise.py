"""Perturbation noise: which stream each value comes from, and how it is drawn on the device.

Step ``t`` of a run with base seed ``seed`` draws from ``seed + t``. Direction ``k`` on tensor
``i`` is its own stream, keyed by ``derive(seed + t, NOISE, k, i)``; the signs ``s_k`` are bits of
``derive(seed + t, SIGNS)`` (plain integers on the host: no device work, no copy).

Two ways to draw a stream, chosen per tensor:

* ``"torch"`` -- torch generators on the tensor's device (Philox, counter-based, on CUDA; the
  CPU generator elsewhere). A stream is cut into chunks of ``CHUNK`` values, chunk ``c`` drawn
  from a generator seeded with ``derive(key, c)``, so a slice at any offset (one shard of a
  tensor, say) is drawn from its chunks alone, and it equals the same range of the whole.
* ``"compiled"`` -- the counter stream of :mod:`qzo_fx.train.counter` (uniform law, float32 CPU
  tensors), filled by the optional numba kernel: ~15x faster than torch's CPU generator.

``backend="auto"`` takes the compiled stream where it applies and numba is installed, else
torch's. The two give different values (same law); a run is reproducible on one set-up.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from qzo_fx.errors import TrainStepError
from qzo_fx.train import compiled, counter

__all__ = ["BACKENDS", "CHUNK", "LAWS", "Noise", "UNIFORM_HALF_WIDTH", "noise_key", "signs"]

BACKENDS = ("auto", "torch", "compiled")
LAWS = ("uniform", "triangular", "logistic", "gaussian")
CHUNK = 1 << 20  # values per generator seed of a torch stream
UNIFORM_HALF_WIDTH = math.sqrt(3.0)  # uniform on (-sqrt 3, sqrt 3): unit variance
_NOISE, _SIGNS = 1, 2  # stream tags


def noise_key(step_seed: int, k: int, i: int) -> int:
    """The key of direction ``k``'s stream on tensor ``i`` in the step seeded ``step_seed``."""
    return counter.derive(step_seed, _NOISE, k, i)


def signs(step_seed: int, n: int) -> list[float]:
    """The step's n random signs ``s_k`` (+1 or -1, each with probability 1/2)."""
    return [1.0 if w & 1 else -1.0 for w in counter.words(counter.derive(step_seed, _SIGNS), n)]


def draw_chunk(out: Tensor, law: str, generator: torch.Generator, scale: float) -> Tensor:
    """``out`` <- i.i.d. values of ``law`` with mean 0 and variance ``scale**2``."""
    if law == "uniform":
        h = UNIFORM_HALF_WIDTH * scale
        return out.uniform_(-h, h, generator=generator)
    if law == "triangular":
        # The sum of two uniforms on (-a/2, a/2) is triangular on (-a, a), variance a^2/6.
        h = math.sqrt(6.0) / 2.0 * scale
        second = torch.empty_like(out).uniform_(-h, h, generator=generator)
        return out.uniform_(-h, h, generator=generator).add_(second)
    if law == "logistic":
        # Logistic(0, s) has variance s^2 pi^2 / 3; s = sqrt(3) / pi gives unit variance.
        p = out.uniform_(0.0, 1.0, generator=generator).clamp_(2.0**-24, 1.0 - 2.0**-24)
        return p.logit_().mul_(math.sqrt(3.0) / math.pi * scale)
    if law == "gaussian":
        return out.normal_(0.0, scale, generator=generator)
    raise ValueError(f"unknown noise law {law!r}")


class Noise:
    """Draws noise streams into tensors on their own device (see the module docstring).

    Example:
        >>> a = Noise("torch").fill(torch.empty(5), "uniform", key=7)
        >>> bool(torch.equal(a[2:], Noise("torch").fill(torch.empty(3), "uniform", key=7, start=2, total=5)))
        True
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise TrainStepError(f"noise backend {backend!r} is invalid: allowed {BACKENDS}.")
        if backend == "compiled" and not compiled.available():
            raise TrainStepError("noise backend 'compiled' needs numba: pip install 'qzo-fx[compiled]', "
                                 "or use backend='auto' or 'torch'.")
        self.backend = backend
        self._generators: dict[torch.device, torch.Generator] = {}

    def stream(self, law: str, like: Tensor) -> str:
        """``"compiled"`` where the counter stream applies to a tensor like ``like``, else ``"torch"``."""
        applies = law == "uniform" and like.device.type == "cpu" and like.dtype == torch.float32
        return "compiled" if self.backend != "torch" and applies and compiled.kernel("fill_uniform") else "torch"

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator

    def fill(self, out: Tensor, law: str, key: int, scale: float = 1.0, start: int = 0,
             total: Optional[int] = None) -> Tensor:
        """``out`` (contiguous) <- values ``start .. start + out.numel()`` of stream ``key``
        (of ``total`` values, default ``start + out.numel()``), variance ``scale**2``."""
        flat = out.view(-1)
        if self.stream(law, out) == "compiled" and out.is_contiguous():
            step = np.float32(UNIFORM_HALF_WIDTH * scale / counter.HALF_LEVELS)
            compiled.kernel("fill_uniform")(flat.detach().numpy(), np.uint64(key), np.int64(start), step)
            return out
        total = start + flat.numel() if total is None else total
        generator = self._generator(out.device)
        position = start
        while position < start + flat.numel():
            chunk = position // CHUNK
            first, last = chunk * CHUNK, min((chunk + 1) * CHUNK, total)
            wanted = slice(position - start, min(last, start + flat.numel()) - start)
            generator.manual_seed(counter.derive(key, chunk))  # host-side: no device sync
            if position == first and wanted.stop - wanted.start == last - first:
                draw_chunk(flat[wanted], law, generator, scale)  # a whole chunk: straight into out
            else:
                whole = draw_chunk(torch.empty(last - first, dtype=out.dtype, device=out.device), law, generator,
                                   scale)
                flat[wanted].copy_(whole[position - first:position - first + wanted.stop - wanted.start])
            position += wanted.stop - wanted.start
        return out
