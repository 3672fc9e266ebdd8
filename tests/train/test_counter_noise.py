"""Counter-based uniform noise: the documented formula, compiled = numpy, slices, statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qzo_fx.train.compiled import kernel
from qzo_fx.train.counter_noise import HALF_LEVELS, fill_uniform

MASK64 = (1 << 64) - 1


def _reference(key: int, j: int, half_width: float) -> float:
    """Value j of stream ``key`` from the module docstring, in plain Python integers."""
    z = (key + (j // 4 + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    level = (z >> (16 * (j % 4))) & 0xFFFF
    level -= 1 << 16 if level >= 1 << 15 else 0
    return float((np.float32(level) + np.float32(0.5)) * np.float32(half_width / HALF_LEVELS))


@pytest.mark.parametrize("use_compiled", [True, False], ids=["compiled", "numpy"])
def test_values_follow_the_documented_formula(use_compiled):
    if use_compiled and kernel("fill_uniform") is None:
        pytest.skip("numba not installed")
    key = 0xDEADBEEF12345678
    out = fill_uniform(torch.empty(11), np.uint64(key), 5, 1.5, use_compiled=use_compiled)
    assert out.tolist() == [_reference(key, j, 1.5) for j in range(5, 16)]


@pytest.mark.skipif(kernel("fill_uniform") is None, reason="numba not installed")
@pytest.mark.parametrize("start,count", [(0, 0), (0, 1), (3, 1), (1, 6), (2, 4), (7, 9), (4, 4096), (13, 100003)])
def test_compiled_and_numpy_fills_are_bit_identical(start, count):
    a, b = torch.empty(count), torch.empty(count)
    fill_uniform(a, np.uint64(42), start, 2.0)
    fill_uniform(b, np.uint64(42), start, 2.0, use_compiled=False)
    assert torch.equal(a, b)


def test_any_slice_equals_the_same_range_of_the_whole_stream():
    whole = fill_uniform(torch.empty(1000), np.uint64(7), 0, 1.0)
    for start, count in [(0, 10), (1, 3), (3, 5), (250, 750), (999, 1)]:
        part = fill_uniform(torch.empty(count), np.uint64(7), start, 1.0)
        assert torch.equal(part, whole[start:start + count])


def test_levels_are_uniform_and_streams_uncorrelated():
    n, half_width = 1 << 20, math.sqrt(3.0)
    a = fill_uniform(torch.empty(n), np.uint64(1), 0, half_width).double()
    b = fill_uniform(torch.empty(n), np.uint64(2), 0, half_width).double()
    # Unit variance, mean 0: standard errors 1/sqrt(n) and sqrt(0.8/n) (uniform's 4th moment 9/5).
    assert abs(float(a.mean())) < 5 / math.sqrt(n)
    assert abs(float(a.var()) - 1.0) < 5 * math.sqrt(0.8 / n)
    # Flat over 64 bins (chi-square with 63 dof: mean 63, sd ~11), lanes of a word and two keys
    # uncorrelated (sd 1/sqrt(n/4) and 1/sqrt(n)).
    counts = torch.histc(a.float(), bins=64, min=-half_width, max=half_width).double()
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    lanes = a.view(-1, 4)
    assert abs(float((lanes[:, 0] * lanes[:, 1]).mean())) < 5 / math.sqrt(n / 4)
    assert abs(float((a * b).mean())) < 5 / math.sqrt(n)


def test_step_words_are_splitmix64_of_the_mixed_seed_and_tag():
    from qzo_fx.train.counter_noise import step_words

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    golden = 0x9E3779B97F4A7C15
    key = mix((mix(12345) + 1 * golden) & MASK64)
    assert step_words(12345, 1, 3) == [mix((key + (w + 1) * golden) & MASK64) for w in range(3)]
    assert step_words(12345, 1, 3) != step_words(12345, 2, 3) != step_words(12346, 1, 3)
    assert step_words(-1, 1, 1) == step_words(MASK64, 1, 1)  # seeds are taken modulo 2**64
    # The sign bit of consecutive steps' first word: balanced like a fair coin (4 sigma).
    ones = sum(step_words(seed, 1, 1)[0] & 1 for seed in range(4000))
    assert abs(ones - 2000) < 4 * math.sqrt(4000) / 2
