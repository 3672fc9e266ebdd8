"""Lower q/dq for no-grad execution: ``qzo.fake_quant`` -> its plain kernel.

Branch graphs never differentiate, so they do not need the custom op's dispatcher and autograd
wrapper (tens of microseconds per call on CPU, several calls per layer per branch). The kernel
is made of aten ops, so ``torch.func.vmap`` batches it without a custom rule.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from qzo_fx.pass_infra import PassResult
from qzo_fx.passes.train.branch_context import BranchContext
from qzo_fx.quant.ops import dequantize_kernel, fake_quant_kernel, fake_sign_kernel

__all__ = ["lower_qdq"]

_KERNELS = {
    torch.ops.qzo.fake_quant.default: fake_quant_kernel,
    torch.ops.qzo.fake_sign.default: fake_sign_kernel,
    torch.ops.qzo.dequantize.default: dequantize_kernel,
}


def lower_qdq(gm: GraphModule, *, ctx: BranchContext) -> PassResult:
    if ctx.kind == "base":
        return PassResult(gm, False)  # the base pass differentiates
    modified = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _KERNELS:
            node.target = _KERNELS[node.target]
            modified = True
    return PassResult(gm, modified)
