"""Blocked low-bit weights as ONNX Runtime's ``MatMulNBits`` (com.microsoft).

ORT does not fuse ``DequantizeLinear(blocked int4 weight) -> Transpose -> MatMul`` (what a
linear layer exports to): every run would dequantize every weight to fp32. This pass rewrites
``F.linear(x, dequantize(codes, blocked))`` and ``x @ dequantize(codes, blocked)`` into
``qzo.matmul_nbits``, which the emitter writes as one ``MatMulNBits`` node, the layout of ORT's
contributed-ops documentation:

* ``B``: uint8 ``[N, K / block_size, block_size * bits / 8]``, the unsigned codes of weight row
  ``n`` (output channel), packed low bits first;
* ``scales``: ``[N * K / block_size]``;
* ``zero_points``: uint8, packed like ``B`` along the blocks of each row; omitted for signed
  (symmetric) codes, whose unsigned form is ``q + 2**(bits - 1)`` with ORT's default zero point
  ``2**(bits - 1)``.

The kernel computes ``x @ ((u - z) * s)^T`` as the model does; ``accuracy_level`` 0 asks for
fp32 arithmetic, so the result equals the dequantized float product up to accumulation order.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from qzo_fx.exporters.export_context import EXPORT_CONTAINER, PACKABLE_KEY, export_container
from qzo_fx.pass_infra import PassResult

__all__ = ["lower_matmul_nbits", "pack_rows", "unpack_rows", "matmul_nbits", "nbits_layout", "nbits_block", "NBITS"]

aten = torch.ops.aten
NBITS = (2, 4, 8)  # the bit widths ORT's CPU MatMulNBits kernel takes
_LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default, torch.mm, aten.mm.default}


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``[..., K]`` (values < 2**bits) packed along the last axis, low bits first:
    ``[..., K * bits / 8]`` uint8."""
    per_byte = 8 // bits
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: Tensor, bits: int, length: int) -> Tensor:
    """The inverse of :func:`pack_rows`: ``[..., length]`` int32 codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :length]


@torch.library.custom_op("qzo::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, packed: Tensor, scales: Tensor, zero_points: Optional[Tensor], bias: Optional[Tensor],
                 k: int, n: int, bits: int, block_size: int) -> Tensor:
    """``x @ W^T (+ bias)`` with ``W`` held in MatMulNBits layout (the eager reference of the node)."""
    blocks = k // block_size
    codes = unpack_rows(packed.reshape(n, blocks * block_size * bits // 8), bits, k).to(scales.dtype)
    if zero_points is None:
        zero = torch.full((n, blocks), float(2 ** (bits - 1)), dtype=scales.dtype)
    else:
        zero = unpack_rows(zero_points.reshape(n, -1), bits, blocks).to(scales.dtype)
    s = scales.reshape(n, blocks)
    weight = (codes - zero.repeat_interleave(block_size, 1)) * s.repeat_interleave(block_size, 1)
    return F.linear(x, weight, bias)


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, bias, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


_MAX_BLOCK = 256  # the largest block MLAS's MatMulNBits kernels take


def _row_block(k: int) -> int:
    """The block a per-row scale is repeated over: the largest power of two <= 256 dividing K
    (0 if K has no such divisor >= 16)."""
    block = _MAX_BLOCK
    while block >= 16 and k % block:
        block //= 2
    return block if block >= 16 else 0


def _weight_operand(gm: GraphModule, node: Node) -> Optional[tuple[Node, bool, int]]:
    """``(dequantize node, transposed, block size)`` if ``node`` multiplies by a dequantized
    weight that MatMulNBits can hold: ``linear(x, W[N, K])`` (rows are output channels) or
    ``x @ W[K, N]`` (transposed), blocked along K, or per output channel with a float input
    (weight-only; with a quantized input the integer kernels QGemm/QLinearMatMul serve)."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR and len(node.args) >= 2:
        weight, transposed = node.args[1], False
    elif node.target in _MATMUL and len(node.args) == 2:
        weight, transposed = node.args[1], True
    else:
        return None
    if not (isinstance(weight, Node) and weight.target is torch.ops.qzo.dequantize.default):
        return None
    axis, block_size = weight.args[3], weight.args[4]
    k_axis = 0 if transposed else 1
    x = node.args[0]
    if block_size == 0 and isinstance(x, Node) and x.target is torch.ops.qzo.quantize_dequantize.default:
        return None  # per-row weights beside quantized inputs: the integer kernels (QGemm) serve
    block = nbits_block(_read(gm, weight.args[0]).shape[k_axis], axis == k_axis, block_size)
    return (weight, transposed, block) if block else None


def _read(gm: GraphModule, node: Node) -> Tensor:
    owner, _, name = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def nbits_layout(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, block_size: int):
    """MatMulNBits buffers of a weight ``[N, K]`` (rows are output channels): integer ``codes``
    (int8 signed or uint8 unsigned), ``scale``/``zero`` per block ``[N, K / block_size]`` or per
    row ``[N]`` (repeated over the row's blocks). Returns ``(B, scales, zero_points or None, K, N)``."""
    n, k = codes.shape
    if scale.dim() == 1:  # one scale per row
        scale, zero = (t.reshape(n, 1).expand(n, k // block_size) for t in (scale, zero))
    signed = codes.dtype == torch.int8
    unsigned = codes.to(torch.int32) + (2 ** (bits - 1) if signed else 0)
    packed = pack_rows(unsigned, bits).reshape(n, k // block_size, block_size * bits // 8)
    zero_points = None if signed else _packed_zero_points(zero.to(torch.int32), bits)
    return packed.contiguous(), scale.contiguous().reshape(-1).clone(), zero_points, k, n


def nbits_block(k: int, axis_is_k: bool, block_size: int) -> int:
    """The MatMulNBits block of a weight blocked along K (``block_size``) or per output row
    (``block_size`` 0: the largest power of two <= 256 dividing K); 0 where ORT has none."""
    if block_size > 0:
        return block_size if axis_is_k and block_size >= 16 and not block_size & (block_size - 1) else 0
    return 0 if axis_is_k else _row_block(k)


def _packed_zero_points(zero: Tensor, bits: int) -> Tensor:
    """``[N, blocks]`` zero points packed per row, each row padded to whole bytes (ORT's layout)."""
    per_byte = 8 // bits
    n, blocks = zero.shape
    padded = torch.zeros((n, -(-blocks // per_byte) * per_byte), dtype=torch.int32)
    padded[:, :blocks] = zero
    return pack_rows(padded, bits).reshape(-1)


def lower_matmul_nbits(gm: GraphModule, *, ctx: object = None) -> PassResult:
    if not getattr(ctx, "ort_contrib_ops", False):
        return PassResult(gm, False)
    container, modified = export_container(gm), False
    bits_of = {key.rpartition(".")[2]: value[0] for key, value in gm.meta.get(PACKABLE_KEY, {}).items()}
    for node in list(gm.graph.nodes):
        found = _weight_operand(gm, node)
        if found is None:
            continue
        dq, transposed, block_size = found
        qname = str(dq.args[0].target).split(".")[1]
        bits = bits_of.get(qname)
        if bits not in NBITS:
            continue
        codes, scale, zero = (_read(gm, a) for a in dq.args[:3])
        if transposed:  # x @ W[K, N]: MatMulNBits rows are the output channels
            codes, scale, zero = (t.t() if t.dim() == 2 else t for t in (codes, scale, zero))
        packed, scales, zero_points, k, n = nbits_layout(codes, scale, zero, bits, block_size)
        holder = nn.Module()
        holder.register_buffer("packed", packed)
        holder.register_buffer("scales", scales)
        if zero_points is not None:
            holder.register_buffer("zero_points", zero_points)
        name = f"{node.name}_nbits"
        container.add_module(name, holder)
        bias = node.args[2] if not transposed and len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            reads = [gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}.{b}") for b in ("packed", "scales")]
            zp = gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}.zero_points") if zero_points is not None else None
            new = gm.graph.call_function(torch.ops.qzo.matmul_nbits.default,
                                         (node.args[0], *reads, zp, bias, k, n, bits, block_size))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
