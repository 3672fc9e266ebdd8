"""Attention over more than four dimensions, as four-dimensional attention.

``F.scaled_dot_product_attention`` batches over every leading dimension, and models use that:
timm's and Hugging Face's Hiera attend within mask units with ``[batch, heads, windows, tokens,
dim]`` inputs. torch.onnx translates only 4-D attention and fails on the rest ("no translation
for aten.scaled_dot_product_attention"), the float model included. Folding the leading
dimensions into one before the call and unfolding the output after it is the same computation,
and the file gets the 4-D attention every runtime fuses.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult

__all__ = ["attention_in_4d", "attention_4d"]

_ATTENTION = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
              torch.ops.aten.scaled_dot_product_attention.default}


def attention_in_4d(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` with the leading dimensions of 5-D and wider inputs
    folded into the batch (grouped-query attention keeps its own broadcasting: left as it is).

    Example:
        >>> q, k, v = (torch.randn(2, 3, 4, 5, 8) for _ in range(3))
        >>> torch.allclose(attention_in_4d(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
    """
    if query.dim() <= 4 or enable_gqa:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    lead = query.shape[:-2]
    key, value = key.expand(*lead, *key.shape[-2:]), value.expand(*lead, *value.shape[-2:])
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*lead, query.shape[-2], key.shape[-2]).flatten(0, -4)
    out = F.scaled_dot_product_attention(query.flatten(0, -4), key.flatten(0, -4), value.flatten(0, -4), attn_mask,
                                         dropout_p, is_causal, scale=scale)
    # A copy in the standard layout before the view (see contiguous_attention).
    return out.contiguous().unflatten(0, lead[:-1])


def attention_4d(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ATTENTION:
            node.target = attention_in_4d  # torch.export traces it; 4-D calls are unchanged
            modified = True
    return PassResult(gm, modified)
