"""Which graph ops carry a quantizable weight, and where their weight and input sit.

Policy lives in the annotator; this table is the mechanism's knowledge of op signatures. It
covers modules (functionalized by ``insert_qdq``), ``torch.nn.functional`` calls and the ATen
ops that ``torch.export`` produces.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["OpSignature", "op_signature", "pool_signature", "POOL", "MHA", "MODULE_TYPES", "multi_head_attention",
           "recurrent", "recurrent_signature"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OpSignature:
    kind: str                 # "linear", "conv", "conv_transpose", "embedding", "matmul", "einsum", "mha", "pool"
    weight_arg: int           # position of the weight among the node's args
    input_arg: Optional[int]  # position of the activation input (None: indices, not quantized)
    channel_axis: int         # per-channel axis of the weight (output channels)
    group_axis: int           # per-group (blocked) axis of the weight (input channels)
    extra_weight_args: tuple[int, ...] = ()   # further weights quantized with the same spec
    extra_input_args: tuple[int, ...] = ()    # further activation inputs (attention key, value)


_LINEAR = OpSignature("linear", 1, 0, 0, 1)
_CONV = OpSignature("conv", 1, 0, 0, 1)
_CONV_T = OpSignature("conv_transpose", 1, 0, 1, 0)
_EMBEDDING = OpSignature("embedding", 1, None, 0, 1)

# MultiheadAttention, functionalized by insert_qdq as
# multi_head_attention(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, ...):
# the packed in-projection [3E, E] gets one quantizer, the out-projection another.
MHA = OpSignature("mha", 3, 0, 0, 1, extra_weight_args=(5,), extra_input_args=(1, 2))

MODULE_TYPES: dict[type, OpSignature] = {
    nn.Linear: _LINEAR,
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.ConvTranspose1d: _CONV_T, nn.ConvTranspose2d: _CONV_T, nn.ConvTranspose3d: _CONV_T,
    nn.Embedding: _EMBEDDING,
}

_FUNCTIONS: dict[Any, OpSignature] = {
    F.linear: _LINEAR, aten.linear.default: _LINEAR,
    F.conv1d: _CONV, F.conv2d: _CONV, F.conv3d: _CONV,
    aten.conv1d.default: _CONV, aten.conv2d.default: _CONV, aten.conv3d.default: _CONV,
    F.conv_transpose1d: _CONV_T, F.conv_transpose2d: _CONV_T, F.conv_transpose3d: _CONV_T,
    F.embedding: _EMBEDDING,
    aten.embedding.default: OpSignature("embedding", 0, None, 0, 1),
}
_MATMULS = (torch.matmul, operator.matmul, torch.mm, aten.matmul.default, aten.mm.default)

# Pooling ops: no weight, but quantizing their input puts a Q right after the producing conv, so
# ONNX Runtime can fuse that conv to QLinearConv (DQ -> Conv -> Q).
POOL = OpSignature("pool", -1, 0, 0, 0)
_POOL_FUNCTIONS = {torch.mean, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                   F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                   aten.mean.dim, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
                   aten.max_pool2d.default}
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


_MEANS = (torch.mean, aten.mean.dim)


def _feature_statistic(node: Node) -> bool:
    """True for a mean over the last axis only, or over every axis: the statistic of a norm
    (RMSNorm's ``x.pow(2).mean(-1)``, a hand-written LayerNorm) or a scalar, not a pool. Quantizing
    its input fuses nothing and puts the squares of a whole feature range on one 8-bit grid."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return True
    dims = [dims] if isinstance(dims, int) else list(dims)
    value = node.args[0].meta.get("val", node.args[0].meta.get("tensor_meta")) if isinstance(node.args[0], Node) \
        else None
    rank = len(value.shape) if hasattr(value, "shape") else None
    return len(dims) == 1 and (dims[0] == -1 or (rank is not None and dims[0] == rank - 1))


def pool_signature(node: Node, modules: dict[str, nn.Module]) -> Optional[OpSignature]:
    """POOL if ``node`` pools or averages a tensor (call_function, call_method or module); a mean
    that is a norm's statistic is not a pool."""
    if node.op == "call_function" and node.target in _MEANS or node.op == "call_method" and node.target == "mean":
        return None if _feature_statistic(node) else POOL
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        return POOL
    if node.op == "call_module" and isinstance(modules.get(node.target), _POOL_MODULES):
        return POOL
    return None


def _is_param(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def op_signature(node: Node, modules: dict[str, nn.Module]) -> Optional[OpSignature]:
    """The signature of ``node`` if it is a quantizable op with a parameter weight, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim and not node.args[3:]:
            return MHA  # packed in-projection only; separate q/k/v weights stay float
        if type(module) in (nn.LSTM, nn.GRU) and module.proj_size == 0 and not node.kwargs:
            return recurrent_signature(module)
        for module_type, sig in MODULE_TYPES.items():
            if type(module) is module_type:
                return sig
        return None
    if node.op != "call_function":
        return None
    if node.target in _FUNCTIONS:
        sig = _FUNCTIONS[node.target]
        # Only positional weights: insert_qdq rewires node.args.
        return sig if len(node.args) > sig.weight_arg and _is_param(node.args[sig.weight_arg]) else None
    if node.target is aten.convolution.default and len(node.args) > 6:
        return (_CONV_T if node.args[6] else _CONV) if _is_param(node.args[1]) else None
    if node.target is aten.addmm.default and len(node.args) >= 3 and _is_param(node.args[2]) \
            and not _is_param(node.args[1]):
        # bias + x @ W with W [in, out]: Hugging Face Conv1D (GPT-2) after torch.export.
        return OpSignature("matmul", 2, 1, -1, 0)
    if node.target in _MATMULS and len(node.args) == 2:
        # x @ W with W [in, out]: output channels are the last axis, input channels the first.
        if _is_param(node.args[1]) and not _is_param(node.args[0]):
            return OpSignature("matmul", 1, 0, -1, 0)
        if _is_param(node.args[0]) and not _is_param(node.args[1]):
            return OpSignature("matmul", 0, 1, 0, 1)
    if node.target in _EINSUMS:
        return einsum_signature(node)
    return None


_EINSUMS = (torch.einsum, torch.functional.einsum)


def einsum_signature(node: Node) -> Optional[OpSignature]:
    """``torch.einsum(equation, x, W)`` (or ``W, x``) with W a parameter: its output channels are
    the indices of W that reach the output and not x, its input channels those summed with x."""
    if len(node.args) != 3 or not isinstance(node.args[0], str) or "..." in node.args[0] or "->" not in node.args[0]:
        return None
    inputs, output = node.args[0].replace(" ", "").split("->")
    terms = inputs.split(",")
    weight_at = next((i for i in (1, 2) if _is_param(node.args[i]) and not _is_param(node.args[3 - i])), None)
    if len(terms) != 2 or weight_at is None:
        return None
    w, x = terms[weight_at - 1], terms[2 - weight_at]
    out_axes = [i for i, c in enumerate(w) if c in output and c not in x]
    in_axes = [i for i, c in enumerate(w) if c in x and c not in output]
    if len(out_axes) != 1 or len(in_axes) != 1:
        return None  # several output or contracted indices: no single channel axis
    return OpSignature("einsum", weight_at, 3 - weight_at, out_axes[0], in_axes[0])


def recurrent_signature(module: nn.RNNBase) -> OpSignature:
    """LSTM/GRU, functionalized as ``recurrent(input, hx, *flat_weights, ...)``: every weight matrix
    (not the biases) of every layer and direction is quantized, per gate row (axis 0)."""
    positions = [2 + i for i, name in enumerate(module._flat_weights_names) if name.startswith("weight")]
    return OpSignature("recurrent", positions[0], 0, 0, 1, extra_weight_args=tuple(positions[1:]))


def recurrent(input, hx, *weights, mode: str, has_biases: bool, num_layers: int, dropout: float, training: bool,
              bidirectional: bool, batch_first: bool, hidden_size: int):
    """``nn.LSTM`` / ``nn.GRU`` forward with the flat weights as arguments (so they can be quantized)."""
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if batch_first else 1)
    batch = input.shape[0 if batch_first else 1]
    if hx is None:
        zeros = input.new_zeros(num_layers * (2 if bidirectional else 1), batch, hidden_size)
        hx = (zeros, zeros) if mode == "LSTM" else zeros
    elif not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if mode == "LSTM" else hx.unsqueeze(1)
    flat = list(weights)
    if mode == "LSTM":
        out, h, c = torch._VF.lstm(input, hx, flat, has_biases, num_layers, dropout, training, bidirectional,
                                   batch_first)
        state = (h, c) if batched else (h.squeeze(1), c.squeeze(1))
    else:
        out, h = torch._VF.gru(input, hx, flat, has_biases, num_layers, dropout, training, bidirectional, batch_first)
        state = h if batched else h.squeeze(1)
    return (out if batched else out.squeeze(0 if batch_first else 1)), state


def multi_head_attention(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                         training: bool, *, num_heads: int, batch_first: bool, dropout: float,
                         bias_k=None, bias_v=None, add_zero_attn: bool = False, key_padding_mask=None,
                         need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                         is_causal: bool = False):
    """``nn.MultiheadAttention.forward`` with its weights as arguments (so they can be quantized)."""
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, query.shape[-1], num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
        add_zero_attn, dropout, out_proj_weight, out_proj_bias, training=training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    return (out.transpose(0, 1) if batch_first else out), weights
