"""Noise streams: the documented counter formula, compiled = plain torch bit for bit, slices at any
offset equal the whole stream (both backends), statistics, independent keys and signs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qzo_fx.train import compiled, counter, noise
from qzo_fx.train.noise import Noise, noise_key, signs

MASK64 = (1 << 64) - 1
needs_numba = pytest.mark.skipif(not compiled.available(), reason="the compiled backend (numba) is not installed")


def _python_value(key: int, j: int, half_width: float) -> float:
    """Value j of counter stream ``key``, from the module docstring, in Python integers."""
    z = (key + (j // 4 + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    level = (z >> (16 * (j % 4))) & 0xFFFF
    level -= 1 << 16 if level >= 1 << 15 else 0
    return float((np.float32(level) + np.float32(0.5)) * np.float32(half_width / 32768.0))


def test_plain_torch_counter_stream_follows_the_documented_formula():
    key = 0xDEADBEEF12345678
    assert counter.uniform_levels(key, 5, 11, 1.5).tolist() == [_python_value(key, j, 1.5) for j in range(5, 16)]


@needs_numba
@pytest.mark.parametrize("start,count", [(0, 0), (0, 1), (3, 1), (1, 6), (2, 4), (7, 9), (4, 4096), (13, 100003)])
def test_compiled_fill_equals_the_plain_torch_stream(start, count):
    key = counter.derive(42, 1, 2, 3)
    out = torch.empty(count)
    compiled.kernel("fill_uniform")(out.numpy(), np.uint64(key), np.int64(start), np.float32(2.0 / 32768.0))
    assert torch.equal(out, counter.uniform_levels(key, start, count, 2.0))


@pytest.mark.parametrize("backend", ["torch", pytest.param("compiled", marks=needs_numba)])
@pytest.mark.parametrize("law", ["uniform", "gaussian", "triangular", "logistic"])
def test_any_slice_equals_the_same_range_of_the_whole_stream(backend, law, monkeypatch):
    monkeypatch.setattr(noise, "CHUNK", 64)  # many chunks on a small tensor
    source = Noise(backend)
    whole = source.fill(torch.empty(1000), law, key=7)
    for start, count in [(0, 10), (1, 3), (60, 10), (250, 750), (999, 1), (64, 128)]:
        part = source.fill(torch.empty(count), law, key=7, start=start, total=1000)
        assert torch.equal(part, whole[start:start + count]), (start, count)


def test_torch_backend_draws_on_the_tensor_device_and_dtype():
    out = Noise("torch").fill(torch.empty(3, 5, dtype=torch.float64), "uniform", key=3)
    assert out.dtype == torch.float64 and out.abs().max() <= math.sqrt(3)
    assert not torch.equal(out, Noise("torch").fill(torch.empty(3, 5, dtype=torch.float64), "uniform", key=4))


@pytest.mark.parametrize("backend", ["torch", pytest.param("compiled", marks=needs_numba)])
def test_uniform_levels_are_uniform_and_streams_uncorrelated(backend):
    n, source = 1 << 20, Noise(backend)
    a = source.fill(torch.empty(n), "uniform", key=noise_key(1, 0, 0)).double()
    b = source.fill(torch.empty(n), "uniform", key=noise_key(1, 0, 1)).double()
    # Unit variance, mean 0: standard errors 1/sqrt(n) and sqrt(0.8/n) (uniform's 4th moment 9/5).
    assert abs(float(a.mean())) < 5 / math.sqrt(n)
    assert abs(float(a.var()) - 1.0) < 5 * math.sqrt(0.8 / n)
    counts = torch.histc(a.float(), bins=64, min=-math.sqrt(3), max=math.sqrt(3)).double()
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())  # chi-square, 63 dof: mean 63, sd ~11
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    lanes = a.view(-1, 4)  # the compiled stream cuts four values from each word
    assert abs(float((lanes[:, 0] * lanes[:, 1]).mean())) < 5 / math.sqrt(n / 4)
    assert abs(float((a * b).mean())) < 5 / math.sqrt(n)


def test_keys_and_signs():
    assert counter.derive(12345, 1) != counter.derive(12345, 2) != counter.derive(12346, 1)
    assert counter.derive(-1, 1) == counter.derive(MASK64, 1)  # seeds are taken modulo 2**64
    assert len({noise_key(7, k, i) for k in range(20) for i in range(20)}) == 400
    ones = sum(s > 0 for seed in range(4000) for s in signs(seed, 1))
    assert abs(ones - 2000) < 4 * math.sqrt(4000) / 2  # a fair coin (4 sigma)
    # The signs and the noise are independent streams.
    source = Noise("torch")
    first = torch.tensor([float(source.fill(torch.empty(1), "uniform", noise_key(s, 0, 0))) for s in range(4000)])
    sign = torch.tensor([signs(s, 1)[0] for s in range(4000)])
    assert abs(float((sign * first).mean())) < 5 / math.sqrt(4000)


def test_compiled_backend_without_numba_is_refused(monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: False)
    with pytest.raises(Exception, match="numba"):
        Noise("compiled")
    with compiled.disabled("fill_uniform"):
        assert Noise("auto").stream("uniform", torch.empty(3)) == "torch"
