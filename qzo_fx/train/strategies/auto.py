"""``auto``: run the candidates in turn on the first steps (each a real step with one candidate),
timing each, then keep the one with the smallest median time."""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from qzo_fx.errors import TrainStepError
from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies.base import Branches, Strategy

__all__ = ["Auto", "AUTO_ROUNDS"]

AUTO_ROUNDS = 5  # timed steps per candidate: a median of 5 rides out a slow step


class Auto(Strategy):
    name = "auto"

    def __init__(self, ctx, candidates: Sequence[Strategy]) -> None:
        super().__init__(ctx)
        self.candidates = {c.name: c for c in candidates}
        self.timings: dict[str, list[float]] = {name: [] for name in self.candidates}
        self.settled: str | None = None

    @property
    def chosen(self) -> str:
        return self.settled or self.name

    def losses(self, branches: Branches, batch: Any, rng_state: RngState) -> Tensor:
        if self.settled is None:
            self._settle()
        if self.settled is not None:
            return self.candidates[self.settled].losses(branches, batch, rng_state)
        name = min((n for n, t in self.timings.items() if len(t) < AUTO_ROUNDS), key=lambda n: len(self.timings[n]))
        self._synchronize()  # on a GPU, time the kernels, not their launch
        start = time.perf_counter()
        try:
            losses = self.candidates[name].losses(branches, batch, rng_state)
        except Exception as error:  # e.g. a loss_fn that vmap cannot batch (.item()) rules it out
            if name == "sequential" or len(self.candidates) == 1:
                raise TrainStepError(f"branch evaluation failed: {type(error).__name__}: {error}") from error
            del self.candidates[name], self.timings[name]
            return self.losses(branches, batch, rng_state)
        self._synchronize()
        self.timings[name].append(time.perf_counter() - start)
        return losses

    def _settle(self) -> None:
        if all(len(t) >= AUTO_ROUNDS for t in self.timings.values()):
            self.settled = min(self.timings, key=lambda n: statistics.median(self.timings[n]))

    def _synchronize(self) -> None:
        for device in {p.device for p in self.ctx.params if p.device.type == "cuda"}:
            torch.cuda.synchronize(device)
