"""numba kernels; import through :func:`qzo_fx.train.compiled.kernel`. Module-level functions,
so numba's on-disk cache finds them again in the next process."""
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from qzo_fx.train.counter import GOLDEN, M1, M2

_GOLDEN, _M1, _M2 = np.uint64(GOLDEN), np.uint64(M1), np.uint64(M2)
_S30, _S27, _S31, _MASK16 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(0xFFFF)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (float32), as torch's CPU ``addcmul`` computes it."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return signature, codegen


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
    """Values ``start ..`` of counter stream ``key`` into ``out`` (qzo_fx.train.counter.uniform_levels)."""
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


@numba.njit(inline="always")
def _perturb_quantize_row(r, out, theta, v, eps, scale, zero, sign, qmin, qmax):
    e = eps[r] if eps.shape[0] > 1 else eps[0]
    s = scale[r] if scale.shape[0] > 1 else scale[0]
    z = zero[r] if zero.shape[0] > 1 else zero[0]
    for c in range(theta.shape[1]):  # branch-free: this loop vectorises
        q = np.rint(_fma(sign * v[r, c], e, theta[r, c]) / s)
        if qmin >= 0:
            q = q + z
        if q < qmin:
            q = qmin
        if q > qmax:
            q = qmax
        if qmin >= 0:
            q = q - z
        out[r, c] = q * s


@numba.njit(cache=True, nogil=True, boundscheck=False)
def perturb_quantize(out, theta, v, eps, scale, zero, sign, qmin, qmax):
    """``out = fake_quant_kernel(addcmul(theta, v, eps, value=sign))`` on [rows, cols] arrays,
    ``eps``, ``scale`` and ``zero`` per row (or one value): torch's operations in torch's order
    (addcmul's fma, div, round half to even, zero-point shift on unsigned grids, clamps that
    keep NaN, mul), so the values are bit-identical. One thread (small weights)."""
    for r in range(theta.shape[0]):
        _perturb_quantize_row(r, out, theta, v, eps, scale, zero, sign, qmin, qmax)


@numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def perturb_quantize_threaded(out, theta, v, eps, scale, zero, sign, qmin, qmax):
    """:func:`perturb_quantize` with rows spread over threads (large weights)."""
    for r in numba.prange(theta.shape[0]):
        _perturb_quantize_row(r, out, theta, v, eps, scale, zero, sign, qmin, qmax)
