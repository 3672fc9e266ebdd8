"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, rounds: int, warmup: int = 3) -> dict:
    """Median seconds per callable, timed round-robin so that machine drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}
