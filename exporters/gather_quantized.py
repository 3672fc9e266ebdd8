"""Quantized embeddings that stay quantized at run time.

``F.embedding(ids, dequantize(codes))`` exports to DequantizeLinear of the whole table followed
by Gather: ONNX Runtime keeps DequantizeLinear nodes on constants (it never folds them), so every
run would dequantize every row of the vocabulary. This pass gathers first:

* blocked 4- or 8-bit tables (along the embedding dimension) -> ORT's ``GatherBlockQuantized``
  (com.microsoft): uint8 data (two 4-bit codes per byte, low nibble first, or one 8-bit code),
  scales ``[V, D / block_size]`` and uint8 zero points packed like the data; signed codes are
  stored as ``q + 2**(bits - 1)`` with that zero point;
* other per-row (per-channel, axis 0) or blocked tables -> standard ``Gather`` of the codes, of
  the scales and of the zero points, then the dequantization of the gathered rows only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from qzo_fx.exporters.export_context import EXPORT_CONTAINER, PACKABLE_KEY, export_container
from qzo_fx.exporters.matmul_nbits import pack_rows, unpack_rows
from qzo_fx.pass_infra import PassResult

__all__ = ["lower_quantized_gather", "gather_layout", "gather_block_quantized", "gather_rows_dequantize"]

aten = torch.ops.aten
_BLOCK_BITS = (4, 8)  # the widths GatherBlockQuantized takes in uint8 storage


@torch.library.custom_op("qzo::gather_block_quantized", mutates_args=())
def gather_block_quantized(indices: Tensor, data: Tensor, scales: Tensor, zero_points: Tensor, bits: int,
                           block_size: int) -> Tensor:
    """Rows ``indices`` of the table held as GatherBlockQuantized data (the node's eager reference)."""
    dim = data.shape[1] * 8 // bits
    codes = unpack_rows(data[indices], bits, dim).to(scales.dtype)
    zero = unpack_rows(zero_points[indices], bits, dim // block_size).to(scales.dtype)
    step = scales[indices]
    return (codes - zero.repeat_interleave(block_size, -1)) * step.repeat_interleave(block_size, -1)


@gather_block_quantized.register_fake
def _(indices, data, scales, zero_points, bits, block_size):
    return scales.new_empty((*indices.shape, data.shape[1] * 8 // bits))


@torch.library.custom_op("qzo::gather_rows_dequantize", mutates_args=())
def gather_rows_dequantize(indices: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Rows ``indices`` of integer codes ``[V, D]``, dequantized with per-row (``[V, 1]``) or blocked
    (``[V, D / block]``) scales: the float operations of ``qzo.dequantize`` on those rows only."""
    rows = codes[indices].to(scale.dtype)
    blocks = scale.shape[-1]
    grouped = rows.reshape(*rows.shape[:-1], blocks, rows.shape[-1] // blocks)
    zero = zero_point[indices].to(scale.dtype).unsqueeze(-1)
    return ((grouped - zero) * scale[indices].unsqueeze(-1)).reshape(rows.shape)


@gather_rows_dequantize.register_fake
def _(indices, codes, scale, zero_point):
    return scale.new_empty((*indices.shape, codes.shape[1]))


def _embedding_operands(node: Node) -> Optional[tuple[Node, Node]]:
    """``(indices, dequantize node)`` for an embedding lookup in a dequantized table."""
    if node.op != "call_function":
        return None
    if node.target is F.embedding and len(node.args) >= 2:
        indices, table = node.args[0], node.args[1]
    elif node.target is aten.embedding.default and len(node.args) >= 2:
        table, indices = node.args[0], node.args[1]
    else:
        return None
    if isinstance(table, Node) and table.target is torch.ops.qzo.dequantize.default and table.args[0].op == "get_attr":
        return indices, table
    return None


def _read(gm: GraphModule, node: Node) -> Tensor:
    owner, _, name = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _blocked_buffers(codes: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    offset = 2 ** (bits - 1) if codes.dtype == torch.int8 else 0
    unsigned, zero_u = codes.to(torch.int32) + offset, zero.to(torch.int32) + offset
    if bits == 8:
        return unsigned.to(torch.uint8), zero_u.to(torch.uint8)
    padded = torch.zeros((zero_u.shape[0], -(-zero_u.shape[1] // 2) * 2), dtype=torch.int32)
    padded[:, : zero_u.shape[1]] = zero_u
    return pack_rows(unsigned, bits), pack_rows(padded, bits)


def gather_layout(codes: Tensor, scale: Tensor, zero: Tensor, axis: int, block_size: int, bits: Optional[int],
                  contrib: bool):
    """``(op, buffers, attributes)`` computing ``embedding(ids, dequantize(codes))`` from the
    codes, or None where the table stays a DequantizeLinear (<= 4-bit blocked codes for a
    portable file: standard Gather takes no INT4, and an int8 container doubles the table)."""
    blocked = block_size > 0 and axis == 1
    if contrib and blocked and bits in _BLOCK_BITS and block_size >= 16 and not block_size & (block_size - 1):
        data, zero_points = _blocked_buffers(codes, zero, bits)
        buffers = {"data": data, "scales": scale.contiguous(), "zero_points": zero_points}
        return torch.ops.qzo.gather_block_quantized.default, buffers, (bits, block_size)
    per_row = block_size == 0 and axis == 0 and scale.dim() == 1
    if per_row or (blocked and (contrib or (bits or 8) > 4)):
        scale, zero = (t.reshape(t.shape[0], -1) for t in (scale, zero))
        return torch.ops.qzo.gather_rows_dequantize.default, {"codes": codes, "scale": scale, "zero_point": zero}, ()
    return None


def lower_quantized_gather(gm: GraphModule, *, ctx: object = None) -> PassResult:
    container, modified = export_container(gm), False
    bits_of = {key.rpartition(".")[2]: value[0] for key, value in gm.meta.get(PACKABLE_KEY, {}).items()}
    for node in list(gm.graph.nodes):
        found = _embedding_operands(node)
        if found is None:
            continue
        indices, dq = found
        bits = bits_of.get(str(dq.args[0].target).split(".")[1])
        codes, scale, zero = (_read(gm, a) for a in dq.args[:3])
        contrib = getattr(ctx, "ort_contrib_ops", False)
        replacement = gather_layout(codes, scale, zero, dq.args[3], dq.args[4], bits, contrib)
        if replacement is None:
            continue
        target, buffers, attributes = replacement
        holder = nn.Module()
        for key, value in buffers.items():
            holder.register_buffer(key, value.contiguous())
        name = f"{node.name}_gather"
        container.add_module(name, holder)
        with gm.graph.inserting_before(node):
            reads = [gm.graph.get_attr(f"{EXPORT_CONTAINER}.{name}.{key}") for key in buffers]
            new = gm.graph.call_function(target, (indices, *reads, *attributes))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    return PassResult(gm, modified)
