"""Annotate: write the resolved quantization spec of every quantizable op into ``node.meta``.

The only pass that reads the config (policy); ``insert_qdq`` realizes whatever is written here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from torch.fx import GraphModule, Node

from qzo_fx.config import QuantSpec
from qzo_fx.context import ANNOTATION_KEY, PrepareContext
from qzo_fx.errors import UnsupportedModelError
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.op_table import POOL, OpSignature, op_signature, pool_signature

__all__ = ["Annotation", "annotate"]


@dataclass(frozen=True)
class Annotation:
    module_name: str
    signature: OpSignature
    weight: Optional[QuantSpec]       # axis resolved to a non-negative int
    activation: Optional[QuantSpec]


def _owner(node: Node, sig: OpSignature) -> str:
    if node.op == "call_module":
        return str(node.target)
    weight = node.args[sig.weight_arg]
    return str(weight.target).rpartition(".")[0]


def _weight_tensor(gm: GraphModule, node: Node, sig: OpSignature):
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return {"mha": lambda: module.in_proj_weight, "recurrent": lambda: module.weight_ih_l0}.get(
            sig.kind, lambda: module.weight)()
    return gm.get_parameter(str(node.args[sig.weight_arg].target))


def _is_parameter(gm: GraphModule, node: Node, sig: OpSignature) -> bool:
    try:
        gm.get_parameter(str(node.args[sig.weight_arg].target))
        return True
    except AttributeError:
        return False


def _resolve_axis(spec: QuantSpec, sig: OpSignature, ndim: int, where: str, shape) -> QuantSpec:
    if spec.granularity == "per_tensor":
        return spec.replace(axis=None)
    default = sig.channel_axis if spec.granularity == "per_channel" else sig.group_axis
    axis = (default if spec.axis is None else spec.axis)
    if not -ndim <= axis < ndim:
        raise UnsupportedModelError(f"{where}: axis={spec.axis} is out of range for a weight of shape {tuple(shape)}.")
    axis %= ndim
    if spec.granularity == "per_group" and shape[axis] % spec.group_size:
        raise UnsupportedModelError(
            f"{where}: group_size={spec.group_size} does not divide the weight's axis {axis} of size "
            f"{shape[axis]}; choose a divisor or override this module with granularity='per_channel'.")
    return spec.replace(axis=axis)


def annotate(gm: GraphModule, *, ctx: PrepareContext) -> PassResult:
    modules = dict(gm.named_modules())
    found: list[tuple[Node, OpSignature]] = []
    for node in gm.graph.nodes:
        sig = op_signature(node, modules)
        if sig is not None and _is_parameter_or_module(gm, node, sig):
            found.append((node, sig))
    drop = set()
    if ctx.config.skip_first and found:
        drop.add(found[0][0])
    if ctx.config.skip_last and found:
        drop.add(found[-1][0])
    modified, problems = False, []
    for node, sig in found:
        name = _owner(node, sig)
        module = ctx.user_modules.get(name)
        module = modules.get(name) if module is None else module
        weight_spec, act_spec = (None, None) if node in drop else ctx.config.resolve(name, module)
        if sig.input_arg is None:
            act_spec = None
        weight = _weight_tensor(gm, node, sig)
        if weight_spec is not None:
            try:
                where = f"module {name!r} (node {node.name})"
                weight_spec = _resolve_axis(weight_spec, sig, weight.dim(), where, weight.shape)
            except UnsupportedModelError as error:
                problems.append(str(error))
                continue
        annotation = Annotation(name, sig, weight_spec, act_spec) if (weight_spec or act_spec) else None
        if node.meta.get(ANNOTATION_KEY) != annotation:
            node.meta[ANNOTATION_KEY] = annotation
            modified = True
    if problems:
        raise UnsupportedModelError("Cannot quantize as configured:\n  " + "\n  ".join(problems))
    return PassResult(gm, _annotate_pools(gm, ctx, modules) or modified)


def _annotate_pools(gm: GraphModule, ctx: PrepareContext, modules: dict[str, nn.Module]) -> bool:
    if not ctx.config.quantize_pool_inputs:
        return False
    modified = False
    for node in gm.graph.nodes:
        if pool_signature(node, modules) is None:
            continue
        name = str(node.target) if node.op == "call_module" else node.name
        activation = ctx.config.resolve(name, modules.get(name))[1]
        annotation = Annotation(name, POOL, None, activation) if activation is not None else None
        if node.meta.get(ANNOTATION_KEY) != annotation:
            node.meta[ANNOTATION_KEY] = annotation
            modified = True
    return modified


def _is_parameter_or_module(gm: GraphModule, node: Node, sig: OpSignature) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        name = {"mha": "in_proj_weight", "recurrent": "weight_ih_l0"}.get(sig.kind, "weight")
        return isinstance(getattr(module, name, None), nn.Parameter)
    return _is_parameter(gm, node, sig)
