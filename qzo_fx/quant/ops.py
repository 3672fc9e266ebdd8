"""The ``qzo`` custom ops: fake quantization with straight-through gradients.

Two ops, defined once and used by every pass and exporter:

* ``qzo::fake_quant(x, scale, zero_point, qmin, qmax, axis, group_size, ste)`` --
  ``(clamp(round_half_even(x / scale) + zp, qmin, qmax) - zp) * scale``, exactly ONNX
  QuantizeLinear -> DequantizeLinear (a division, never a multiply by ``1/scale``, so ties
  round like ONNX Runtime).
* ``qzo::fake_sign(x, scale, axis, group_size, ste)`` -- 1 bit: ``scale * sign(x)`` with
  ``sign(0) = +1`` so that every value lies on the two-level grid.

Scale layout: a 0-d tensor per tensor; a 1-d tensor of ``x.shape[axis]`` entries per channel;
per group (``group_size > 0``) a tensor shaped like ``x`` with ``x.shape[axis] / group_size``
along ``axis`` (the ONNX blocked layout).

Gradients: ``x`` gets the surrogate of ``ste``; ``scale`` gets the LSQ gradient scaled by
``1 / sqrt(N * qmax)`` (N elements per scale entry) when it requires grad; ``zero_point`` none.
Fake kernels let torch.export and torch.compile trace the ops; vmap rules let perturbation
branches run batched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fake_quant", "FAKE_QUANT", "fake_sign", "dequantize", "fake_quant_kernel", "fake_sign_kernel",
           "dequantize_kernel", "fake_quant_foreach_", "expand_param", "grid_codes", "SIGN_SURROGATES"]


def expand_param(param: Tensor, x: Tensor, axis: int, group_size: int) -> Tensor:
    """Broadcast a scale or zero point of the documented layout against ``x``."""
    if param.dim() == 0:
        return param
    if group_size > 0:
        return param.repeat_interleave(group_size, dim=axis)
    shape = [1] * x.dim()
    shape[axis] = param.numel()
    return param.reshape(shape)


def grid_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The grid integers ``clamp(round(x / s) + z)`` (as floats) with ``s``, ``z`` broadcastable
    against ``x``: the same operations as fake_quant's forward, so these are exactly its codes."""
    return torch.div(x, scale).round_().add_(zero_point).clamp_(qmin, qmax)


def _reduce_to(grad: Tensor, param: Tensor, axis: int, group_size: int) -> Tensor:
    """Sum a full-size gradient back onto the layout of ``param`` (inverse of expand_param)."""
    if param.dim() == 0:
        return grad.sum()
    if group_size > 0:
        moved = grad.movedim(axis, -1)
        blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group_size, group_size)
        return blocks.sum(-1).movedim(-1, axis)
    dims = [d for d in range(grad.dim()) if d != axis]
    return grad.sum(dim=dims)


def _lsq_grad_factor(x: Tensor, scale: Tensor, qmax: int) -> float:
    per_entry = x.numel() / max(scale.numel(), 1)
    return 1.0 / math.sqrt(per_entry * max(qmax, 1))


# ---------------------------------------------------------------------------- fake_quant
def fake_quant_kernel(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: int, group_size: int, ste: str = "identity") -> Tensor:
    """The forward of ``qzo.fake_quant`` in plain aten ops: what no-grad branch graphs call
    (no dispatcher or autograd wrapper per call, and vmap batches it natively)."""
    s = expand_param(scale, x, axis, group_size)
    q = torch.div(x, s).round_()
    if torch._C._functorch.is_batchedtensor(q):
        return _clamp_batched(q, s, zero_point, qmin, qmax, axis, group_size)
    # In-place ops with a 0-d tensor operand take a slow path on CPU (several times slower here);
    # a stride-0 view of x's shape takes the vectorized one, with the same values.
    s = s.expand(q.shape) if s.dim() == 0 else s
    if qmin < 0:
        # Signed grids are symmetric: their zero point is 0 (see calibration).
        return q.clamp_(qmin, qmax).mul_(s)
    if zero_point.dim() == 0 and q.device.type == "cpu":
        # The zero point is an integer, so clamp(q + z, qmin, qmax) - z = clamp(q, qmin - z, qmax - z)
        # exactly in float: four passes over x instead of six (a CPU tensor's value is read for free).
        z = float(zero_point)
        return q.clamp_(qmin - z, qmax - z).mul_(s)
    z = expand_param(zero_point, x, axis, group_size)
    return q.add_(z).clamp_min_(qmin).clamp_max_(qmax).sub_(z).mul_(s)


def _clamp_batched(q: Tensor, s: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int,
                   group_size: int) -> Tensor:
    """The kernel's clamp and scale under vmap (batched branches): clamp_min_/clamp_max_ have
    batching rules, clamp_ with two bounds has none. The same values as the unbatched path."""
    if qmin < 0:
        return q.clamp_min_(qmin).clamp_max_(qmax).mul_(s)
    z = expand_param(zero_point, q, axis, group_size)
    return q.add_(z).clamp_min_(qmin).clamp_max_(qmax).sub_(z).mul_(s)


def fake_quant_foreach_(xs: list[Tensor], scales: list[Tensor], zero_points: list[Tensor],
                        qmins: list[int], qmaxs: list[int]) -> None:
    """``fake_quant_kernel`` on many tensors at once, in place: one ``torch._foreach_*`` call per
    operation instead of five ops per tensor. The kernel's operations in the kernel's order, so
    the values are bit-identical; ``scales``/``zero_points`` already broadcast against ``xs``."""
    unsigned = [i for i, qmin in enumerate(qmins) if qmin >= 0]  # signed grids skip the zero point
    shifted, zeros = [xs[i] for i in unsigned], [zero_points[i] for i in unsigned]
    torch._foreach_div_(xs, scales)
    torch._foreach_round_(xs)
    if unsigned:
        torch._foreach_add_(shifted, zeros)
    torch._foreach_clamp_min_(xs, qmins)
    torch._foreach_clamp_max_(xs, qmaxs)
    if unsigned:
        torch._foreach_sub_(shifted, zeros)
    torch._foreach_mul_(xs, scales)


# Defined through torch.library.Library rather than torch.library.custom_op, so that the op's
# autograd kernel is one plain autograd.Function (below). custom_op's generated one uses
# setup_context, and autograd.Function.apply then binds the arguments through inspect.signature
# on every call: ~70 us of Python per call. The STE W8A8 step makes 150 calls on DeiT-tiny
# (benchmarks/step_overhead.py, docs/performance.md). The graphs still call the op, so passes,
# export and vmap see one node.
_LIB = torch.library.Library("qzo", "FRAGMENT")
_LIB.define("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, "
            "int group_size, str ste) -> Tensor")
FAKE_QUANT = torch.ops.qzo.fake_quant.default


def _fq_forward(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                axis: int, group_size: int, ste: str) -> Tensor:
    return fake_quant_kernel(x, scale, zero_point, qmin, qmax, axis, group_size)


_LIB.impl("fake_quant", _fq_forward, "CompositeExplicitAutograd")


@torch.library.register_fake("qzo::fake_quant")
def _(x, scale, zero_point, qmin, qmax, axis, group_size, ste):
    return torch.empty_like(x)


def _fq_backward(ctx, grad: Tensor):
    qmin, qmax, axis, group_size, ste = ctx.meta
    if not ctx.saved_tensors:
        return grad, None, None, None, None, None, None, None
    x, scale, zero_point = ctx.saved_tensors
    s = expand_param(scale, x, axis, group_size)
    z = expand_param(zero_point, x, axis, group_size)
    v = x / s
    level = v + z
    below, above = level < qmin, level > qmax
    inside = ~(below | above)
    grad_x = grad if ste == "identity" else grad * inside
    grad_scale = None
    if ctx.needs_input_grad[1]:
        # d/ds of s*(clamp(round(x/s)+z) - z), round passed straight through (LSQ).
        local = torch.where(inside, torch.round(v) - v, torch.where(below, qmin - z, qmax - z))
        grad_scale = _reduce_to(grad * local, scale, axis, group_size) * _lsq_grad_factor(x, scale, qmax)
    return grad_x, grad_scale, None, None, None, None, None, None


class _FakeQuantSTE(torch.autograd.Function):
    """The op under autograd: the kernel forward, the straight-through backward. Written with
    ``ctx`` in ``forward`` (no ``setup_context``): ``apply`` then skips binding the arguments
    through ``inspect.signature``, ~90 us of the ~240 us a call of a 200k-element tensor took."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size, ste):
        ctx.meta = (qmin, qmax, axis, group_size, ste)
        # Identity STE with a fixed scale saves nothing: its backward is a pass-through.
        if ste in ("clipped", "lsq") or scale.requires_grad:
            ctx.save_for_backward(x, scale, zero_point)
        # The op again below autograd: what dispatch modes, tracing and vmap see is the op itself.
        with torch._C._AutoDispatchBelowAutograd():
            return FAKE_QUANT(x, scale, zero_point, qmin, qmax, axis, group_size, ste)

    backward = staticmethod(_fq_backward)


def _fq_autograd(x, scale, zero_point, qmin, qmax, axis, group_size, ste):
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis, group_size, ste)


_LIB.impl("fake_quant", _fq_autograd, "Autograd")


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
               axis: int, group_size: int, ste: str) -> Tensor:
    """``qzo::fake_quant`` (see the module docstring)."""
    return FAKE_QUANT(x, scale, zero_point, qmin, qmax, axis, group_size, ste)


@torch.library.register_vmap("qzo::fake_quant")
def _fq_vmap(info, in_dims, x, scale, zero_point, qmin, qmax, axis, group_size, ste):
    x_dim, scale_dim, zp_dim = in_dims[:3]
    if scale_dim is not None or zp_dim is not None:
        raise NotImplementedError("qzo.fake_quant: batching over scales is not supported")
    x = x.movedim(x_dim, 0) if x_dim is not None else x.unsqueeze(0)
    scale, zero_point = _unsqueeze_blocked(scale, group_size), _unsqueeze_blocked(zero_point, group_size)
    out = fake_quant(x, scale, zero_point, qmin, qmax, axis + 1, group_size, ste)
    return out, 0


def _unsqueeze_blocked(param: Tensor, group_size: int) -> Tensor:
    # Blocked params have one dim per dim of x, so they gain the branch axis too.
    return param.unsqueeze(0) if group_size > 0 and param.dim() > 0 else param


# ---------------------------------------------------------------------------- dequantize
def dequantize_kernel(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int) -> Tensor:
    """``(codes - zero_point) * scale`` in the layout of ``scale`` (plain aten ops, vmap-able)."""
    s = expand_param(scale, codes, axis, block_size)
    z = expand_param(zero_point, codes, axis, block_size)
    return (codes.to(scale.dtype) - z.to(scale.dtype)) * s  # q - 0 is exact: symmetric stays q * s


@torch.library.custom_op("qzo::dequantize", mutates_args=())
def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int, block_size: int) -> Tensor:
    """Integer codes -> values: what weights held as codes (ZOQO, export) read through."""
    return dequantize_kernel(codes, scale, zero_point, axis, block_size)


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size):
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


# ---------------------------------------------------------------------------- fake_sign
SIGN_SURROGATES = {
    "identity": lambda u: torch.ones_like(u),
    "clipped": lambda u: (u.abs() <= 1).to(u.dtype),
    "lsq": lambda u: (u.abs() <= 1).to(u.dtype),
    "hardtanh": lambda u: (u.abs() <= 1).to(u.dtype),
    "tanh": lambda u: 1 - torch.tanh(u).square(),
    "approxsign": lambda u: (2 - 2 * u.abs()).clamp_min(0),
}


def fake_sign_kernel(x: Tensor, scale: Tensor, axis: int, group_size: int, ste: str = "identity") -> Tensor:
    """The forward of ``qzo.fake_sign`` in plain aten ops (see fake_quant_kernel)."""
    s = expand_param(scale, x, axis, group_size)
    return torch.where(x >= 0, s, -s).to(x.dtype)


@torch.library.custom_op("qzo::fake_sign", mutates_args=())
def fake_sign(x: Tensor, scale: Tensor, axis: int, group_size: int, ste: str) -> Tensor:
    return fake_sign_kernel(x, scale, axis, group_size).expand_as(x).clone()


@fake_sign.register_fake
def _(x, scale, axis, group_size, ste):
    return torch.empty_like(x)


def _fs_setup(ctx, inputs, output) -> None:
    x, scale, axis, group_size, ste = inputs
    ctx.meta = (axis, group_size, ste)
    ctx.save_for_backward(x, scale)


def _fs_backward(ctx, grad: Tensor):
    axis, group_size, ste = ctx.meta
    x, scale = ctx.saved_tensors
    s = expand_param(scale, x, axis, group_size)
    grad_x = grad if ste == "identity" else grad * SIGN_SURROGATES[ste](x / s)
    grad_scale = None
    if ctx.needs_input_grad[1]:
        sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        grad_scale = _reduce_to(grad * sign, scale, axis, group_size) * _lsq_grad_factor(x, scale, 1)
    return grad_x, grad_scale, None, None, None


fake_sign.register_autograd(_fs_backward, setup_context=_fs_setup)


@torch.library.register_vmap("qzo::fake_sign")
def _fs_vmap(info, in_dims, x, scale, axis, group_size, ste):
    if in_dims[1] is not None:
        raise NotImplementedError("qzo.fake_sign: batching over scales is not supported")
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.unsqueeze(0)
    return fake_sign(x, _unsqueeze_blocked(scale, group_size), axis + 1, group_size, ste), 0
