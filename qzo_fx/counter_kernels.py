"""The compiled fill of :mod:`qzo_fx.counter_noise` (imported only where numba is installed).

Module-level functions, so numba's on-disk cache finds them again in the next process.
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
def fill(out, key, start, step):
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
