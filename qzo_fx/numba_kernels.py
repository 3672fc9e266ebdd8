"""Compiled kernels (numba), each one pass where torch needs several. Import through
:func:`qzo_fx.compiled.kernel`, which gives None where numba is not installed; every caller
keeps a torch/numpy path with identical values. Module-level functions, so numba's on-disk
cache finds them again in the next process.
"""
import numba
import numpy as np

from qzo_fx.counter_noise import _GOLDEN, _M1, _M2, _MASK16, _S30, _S27, _S31


@numba.njit(inline="always")
def _word(key, w):
    z = key + np.uint64(w + 1) * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(inline="always")
def _value(z, lane, step):
    level = np.int16((z >> np.uint64(16 * lane)) & _MASK16)
    return (np.float32(level) + np.float32(0.5)) * step


@numba.njit(cache=True, nogil=True, boundscheck=False)
def fill_uniform(out, key, start, step):
    """Values ``start ..`` of counter stream ``key`` into ``out`` (see qzo_fx.counter_noise)."""
    count, j = out.shape[0], 0
    while j < count and (start + j) & 3:  # up to a word boundary
        out[j] = _value(_word(key, (start + j) >> 2), (start + j) & 3, step)
        j += 1
    first = (start + j) >> 2
    for w in range((count - j) >> 2):  # whole words, four values each: this loop vectorises
        z, at = _word(key, first + w), j + 4 * w
        out[at] = _value(z, 0, step)
        out[at + 1] = _value(z, 1, step)
        out[at + 2] = _value(z, 2, step)
        out[at + 3] = _value(z, 3, step)
    j += 4 * ((count - j) >> 2)
    while j < count:  # the last partial word
        out[j] = _value(_word(key, (start + j) >> 2), (start + j) & 3, step)
        j += 1


@numba.njit(cache=True, nogil=True, boundscheck=False)
def perturb_quantize_rows(out, theta, v, eps, scale, zero, sign, qmin, qmax):
    """``out = fake_quant(theta + sign * v * eps)`` on [rows, cols] arrays, ``eps``, ``scale`` and
    ``zero`` per row (or one value). torch's operations in torch's order -- addcmul's
    ``theta + (sign * v) * eps``, then the kernel's div, round (half to even), zero-point shift
    on unsigned grids, clamps that keep NaN, mul -- so the values are bit-identical."""
    rows, cols = theta.shape
    for r in range(rows):
        e = eps[r if eps.shape[0] > 1 else 0]
        s = scale[r if scale.shape[0] > 1 else 0]
        z = zero[r if zero.shape[0] > 1 else 0]
        for c in range(cols):
            q = np.rint((theta[r, c] + sign * v[r, c] * e) / s)
            if qmin >= 0:
                q = q + z
            if q < qmin:
                q = qmin
            if q > qmax:
                q = qmax
            if qmin >= 0:
                q = q - z
            out[r, c] = q * s
