"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_rounds(fns: dict, rounds: int, warmup: int = 3, block: int = 1, clock: str = "wall") -> dict:
    """Seconds per call of each callable, per round (a list of ``rounds`` lists), timed
    round-robin so that machine drift hits all alike.

    ``clock="cpu"``: the process's CPU time (all threads) instead of wall time. On a machine
    shared with other jobs it counts this process's work only; run it with
    ``OMP_WAIT_POLICY=PASSIVE`` so that threads waiting at a barrier do not spin (spinning would
    count as work).

    ``block > 1``: each turn runs a callable ``block`` times in a row and drops the first call,
    which pays for caches the previous callable filled with its own data. That is steady-state
    latency (a deployed model runs back to back), still interleaved against drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    now = CLOCKS[clock]
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            kept = []
            for call in range(block):
                start = now()
                fn()
                if block == 1 or call > 0:
                    kept.append(now() - start)
            samples[name].append(kept)
    return samples


def interleaved(fns: dict, rounds: int, warmup: int = 3, block: int = 1) -> dict:
    """Median seconds per call of each callable (see :func:`interleaved_rounds`)."""
    return medians(interleaved_rounds(fns, rounds, warmup, block))


def medians(samples: dict) -> dict:
    return {name: statistics.median(t for kept in rounds for t in kept) for name, rounds in samples.items()}


def paired_ratio(samples: dict, name: str, base: str) -> float:
    """Median over rounds of (mean time of ``name``) / (mean time of ``base``) in the same round.

    The two were timed seconds apart, so the VM's drift (2x over minutes here) cancels in each
    round's ratio, where a ratio of two medians would mix different phases.
    """
    return statistics.median(statistics.fmean(a) / statistics.fmean(b)
                             for a, b in zip(samples[name], samples[base]))
