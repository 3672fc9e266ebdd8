"""Compiled kernels (numba), each one pass where torch needs several. Import through
:func:`qzo_fx.train.compiled.kernel`, which gives None where numba is not installed; every caller
keeps a torch/numpy path with identical values. Module-level functions, so numba's on-disk
cache finds them again in the next process.
"""
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from qzo_fx.train.counter_noise import _GOLDEN, _M1, _M2, _MASK16, _S30, _S27, _S31


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
    """Values ``start ..`` of counter stream ``key`` into ``out`` (see qzo_fx.train.counter_noise)."""
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
def perturb_quantize_rows(out, theta, v, eps, scale, zero, sign, qmin, qmax):
    """``out = fake_quant(theta + sign * v * eps)`` on [rows, cols] arrays, ``eps``, ``scale`` and
    ``zero`` per row (or one value). torch's operations in torch's order -- addcmul's
    ``fma(sign * v, eps, theta)``, then the kernel's div, round (half to even), zero-point shift
    on unsigned grids, clamps that keep NaN, mul -- so the values are bit-identical. One
    thread: for small weights, where starting threads costs more than it saves."""
    for r in range(theta.shape[0]):
        _perturb_quantize_row(r, out, theta, v, eps, scale, zero, sign, qmin, qmax)


@numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def perturb_quantize_changes(out, theta, v, eps, scale, zero, sign, qmin, qmax, base, where):
    """:func:`perturb_quantize_rows` with rows spread over threads (like torch's ops), which
    with a ``base`` of ``out``'s shape (else pass an empty array) also lists the flat indices
    where ``out != base`` (NaN counts as changed), ascending, into ``where`` while it has room,
    and returns how many there are: each row is compared while it is still in L1, instead of a
    second pass over both weights."""
    rows, cols = theta.shape
    compare = base.shape[0] == rows
    changed = np.zeros(rows, np.int64)
    for r in numba.prange(rows):
        _perturb_quantize_row(r, out, theta, v, eps, scale, zero, sign, qmin, qmax)
        if compare:
            differ = 0
            for c in range(cols):  # counted branch-free (it vectorises): most rows have no change
                differ += out[r, c] != base[r, c]
            changed[r] = differ
    if not compare:
        return 0
    first = np.empty(rows, np.int64)  # where each row's changes start in the list
    count = 0
    for r in range(rows):
        first[r] = count
        count += changed[r]
    room = where.shape[0]
    for r in numba.prange(rows):
        at, left, c = first[r], changed[r], 0
        while left > 0 and at < room:
            if out[r, c] != base[r, c]:
                where[at] = r * cols + c
                at += 1
                left -= 1
            c += 1
    return count


@numba.njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def add_weight_changes(out, base_out, x, weight, base_weight, where):
    """``out = base_out + x @ (weight - base_weight)^T`` over the flat indices ``where`` of the
    changed weights only: ``out[r, o] += x[r, i] * change`` for each change in ``where``'s
    order, the order of ``index_add`` over a column gather (the same sums, bit for bit). Rows
    outer (and spread over threads): a row of ``x`` and of ``out`` stays in L1 while every
    change is applied to it."""
    cols = weight.shape[1]
    count = where.shape[0]
    outputs = np.empty(count, np.int64)
    inputs = np.empty(count, np.int64)
    change = np.empty(count, np.float32)
    for j in range(count):
        o, i = where[j] // cols, where[j] % cols
        outputs[j], inputs[j] = o, i
        change[j] = weight[o, i] - base_weight[o, i]
    for r in numba.prange(x.shape[0]):
        for o in range(out.shape[1]):  # a loop, not a slice assignment: no view object per row
            out[r, o] = base_out[r, o]
        for j in range(count):
            out[r, outputs[j]] += x[r, inputs[j]] * change[j]

