"""Attention outputs in the standard layout before torch.onnx sees them.

On CPU, ``F.scaled_dot_product_attention`` returns its output in the layout of its fused kernel
(heads and sequence swapped in memory), while the exported program records the standard one.
When torch.onnx decomposes the program, a ``transpose`` + ``reshape`` after the attention is
decomposed against one layout and run against the other, and the recorded ``view`` fails
("Cannot view a tensor with shape ... and strides ..."; timm's MaxViT, and Hugging Face
Wav2Vec2-Conformer, whose attention runs inside a module partial capture leaves as it is). A
``contiguous`` copy after each attention output makes the layout the same on both sides; in the
ONNX file it is no op at all. The pass runs on the exported program, where every attention call is
visible: the prepared graph's and those inside modules it calls.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qzo_fx.exporters.attention_4d import attention_in_4d
from qzo_fx.pass_infra import PassResult

__all__ = ["contiguous_attention"]

aten = torch.ops.aten
_ATTENTION = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
              aten.scaled_dot_product_attention.default, attention_in_4d}
# Fused variants that torch.export can record: their first output is the attention.
_FUSED_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default}


def _attention_outputs(gm: GraphModule) -> list[Node]:
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ATTENTION:
            found.append(node)
        elif node.target in _FUSED_ATTENTION:
            found += [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    return found


def _is_contiguous_copy(node: Node) -> bool:
    return node.target is aten.clone.default and node.kwargs.get("memory_format") == torch.contiguous_format


def contiguous_attention(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for output in _attention_outputs(gm):
        users = list(output.users)
        if len(users) == 1 and _is_contiguous_copy(users[0]):
            continue  # already a contiguous copy (the model's own, or this pass's)
        with gm.graph.inserting_after(output):
            copy = gm.graph.call_function(aten.clone.default, (output,), {"memory_format": torch.contiguous_format})
        output.replace_all_uses_with(copy, delete_user_cb=lambda user, copy=copy: user is not copy)
        modified = True
    return PassResult(gm, modified)
