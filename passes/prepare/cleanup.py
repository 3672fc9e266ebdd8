"""Cleanup: drop ``get_attr`` and ``qzo`` nodes that nothing reads any more.

Deliberately narrow: a general dead-code pass could remove user ops with side effects
(in-place updates whose result is unused).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult

__all__ = ["cleanup"]

_QZO_OPS = (torch.ops.qzo.fake_quant.default, torch.ops.qzo.fake_sign.default)


def cleanup(gm: GraphModule, *, ctx: object = None) -> PassResult:
    modified = False
    for node in reversed(list(gm.graph.nodes)):
        removable = node.op == "get_attr" or (node.op == "call_function" and node.target in _QZO_OPS)
        if removable and not node.users:
            gm.graph.erase_node(node)
            modified = True
    return PassResult(gm, modified)
