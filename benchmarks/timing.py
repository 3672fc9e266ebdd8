"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, rounds: int, warmup: int = 3, block: int = 1) -> dict:
    """Median seconds per callable, timed round-robin so that machine drift hits all alike.

    ``block > 1``: each turn runs a callable ``block`` times in a row and drops the first call,
    which pays for caches the previous callable filled with its own data. That is steady-state
    latency (a deployed model runs back to back), still interleaved against drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for call in range(block):
                start = time.perf_counter()
                fn()
                if block == 1 or call > 0:
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}
