"""Insert q/dq: realize every annotation as ``qzo.fake_quant`` / ``qzo.fake_sign`` nodes.

Modules with a quantized weight are first rewritten as their functional call (``fc1(x)`` ->
``F.linear(x, fq(fc1.weight), fc1.bias)``) so the weight is a visible graph value; the module
stays registered, so parameter names and ``state_dict`` keys do not change. One quantizer per
parameter (tied weights share it) and one per (activation, spec).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qzo_fx.config import QuantSpec
from qzo_fx.context import ANNOTATION_KEY, QUANT_CONTAINER, QUANTIZER_KEY, PrepareContext
from qzo_fx.pass_infra import PassResult
from qzo_fx.quant.op_table import multi_head_attention, recurrent
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["insert_qdq", "functional_form"]

_REALIZED = "qzo.realized"
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def functional_form(module: nn.Module, x, weight, bias):
    """``(function, args)`` computing ``module(x)`` with ``weight``/``bias`` as graph values."""
    if isinstance(module, nn.Linear):
        return F.linear, (x, weight, bias)
    if isinstance(module, nn.Embedding):
        return F.embedding, (x, weight, module.padding_idx, module.max_norm, module.norm_type,
                             module.scale_grad_by_freq, module.sparse)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        fn = _CONV_T[len(module.kernel_size)]
        return fn, (x, weight, bias, module.stride, module.padding, module.output_padding, module.groups,
                    module.dilation)
    fn = _CONV[len(module.kernel_size)]
    return fn, (x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _functionalize_mha(gm: GraphModule, node: Node) -> Node:
    module: nn.MultiheadAttention = gm.get_submodule(str(node.target))
    prefix = str(node.target)
    with gm.graph.inserting_before(node):
        def read(name: str):  # a graph read of module.<name>, or None where the module has none
            owner, _, attr = name.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            return gm.graph.get_attr(f"{prefix}.{name}") if getattr(holder, attr, None) is not None else None

        query, key, value = node.args[:3]
        args = (query, key, value, read("in_proj_weight"), read("in_proj_bias"), read("out_proj.weight"),
                read("out_proj.bias"), _training_flag(gm, prefix))
        kwargs = dict(num_heads=module.num_heads, batch_first=module.batch_first, dropout=module.dropout,
                      bias_k=read("bias_k"), bias_v=read("bias_v"), add_zero_attn=module.add_zero_attn, **node.kwargs)
        new = gm.graph.call_function(multi_head_attention, args, kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _training_flag(gm: GraphModule, prefix: str) -> Node:
    """A graph read of the module's ``training`` flag: dropout inside the fused op follows the
    mode at run time (one graph may serve both). torch.fx warns on any get_attr of a plain
    attribute; this one is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        return gm.graph.get_attr(f"{prefix}.training")


def _functionalize_recurrent(gm: GraphModule, node: Node) -> Node:
    module: nn.RNNBase = gm.get_submodule(str(node.target))
    prefix = str(node.target)
    with gm.graph.inserting_before(node):
        weights = [gm.graph.get_attr(f"{prefix}.{name}") for name in module._flat_weights_names]
        hx = node.args[1] if len(node.args) > 1 else None
        kwargs = dict(mode=module.mode, has_biases=module.bias, num_layers=module.num_layers, dropout=module.dropout,
                      training=_training_flag(gm, prefix), bidirectional=module.bidirectional,
                      batch_first=module.batch_first, hidden_size=module.hidden_size)
        new = gm.graph.call_function(recurrent, (node.args[0], hx, *weights), kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _functionalize(gm: GraphModule, node: Node) -> Node:
    module = gm.get_submodule(str(node.target))
    if isinstance(module, nn.MultiheadAttention):
        return _functionalize_mha(gm, node)
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return _functionalize_recurrent(gm, node)
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if getattr(module, "bias", None) is not None else None
        x = node.args[0]
        if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
            # Same as _ConvNd._conv_forward: explicit pad, then a conv without padding.
            x = gm.graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                       {"mode": module.padding_mode})
            fn, args = functional_form(module, x, weight, bias)
            args = args[:4] + ((0,) * len(module.kernel_size),) + args[5:]
        else:
            fn, args = functional_form(module, x, weight, bias)
        new = gm.graph.call_function(fn, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _container(gm: GraphModule) -> nn.Module:
    if not hasattr(gm, QUANT_CONTAINER):
        gm.add_submodule(QUANT_CONTAINER, nn.Module())
    return getattr(gm, QUANT_CONTAINER)


def _unique(container: nn.Module, base: str) -> str:
    name = base.replace(".", "_") or "q"
    candidate, i = name, 1
    while hasattr(container, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _fq_node(gm: GraphModule, before: Node, value: Node, qname: str, quantizer: Quantizer) -> Node:
    prefix = f"{QUANT_CONTAINER}.{qname}"
    with gm.graph.inserting_before(before):
        scale = gm.graph.get_attr(f"{prefix}.scale")
        if quantizer.is_sign:
            args = (value, scale, quantizer.axis, quantizer.group_size, quantizer.spec.ste)
            node = gm.graph.call_function(torch.ops.qzo.fake_sign.default, args)
        else:
            zero = gm.graph.get_attr(f"{prefix}.zero_point")
            qmin, qmax = quantizer.spec.qrange
            args = (value, scale, zero, qmin, qmax, quantizer.axis, quantizer.group_size, quantizer.spec.ste)
            node = gm.graph.call_function(torch.ops.qzo.fake_quant.default, args)
    node.meta[QUANTIZER_KEY] = qname
    return node


class _Inserter:
    """Adds fq nodes to one graph. Quantizers outlive the graph: ``ctx.quantizers`` maps what a
    quantizer quantizes (a parameter, or an activation site) to its name, so the graph of the
    other mode reuses the same quantizer for the same tensor."""

    def __init__(self, gm: GraphModule, ctx: PrepareContext) -> None:
        self.gm, self.container, self.names = gm, _container(gm), ctx.quantizers
        # Activation quantizers live where the model does (a model prepared on a GPU stays there).
        self.device = next(iter(gm.parameters()), next(iter(gm.buffers()), torch.empty(()))).device
        self.nodes: dict[object, Node] = {}  # quantized tensor -> its fq node in this graph
        self.seen: dict[tuple, int] = {}      # activation site -> times met in this graph

    def weight(self, op: Node, arg: int, spec: QuantSpec, axis_group: tuple[int, int]) -> None:
        param = op.args[arg]
        target = str(param.target)
        weight = self.gm.get_parameter(target)
        key = ("weight", id(weight))  # tied weights are one parameter: one quantizer
        if key not in self.nodes:
            if key not in self.names:
                qname = _unique(self.container, target)
                quantizer = Quantizer(spec, "weight", target, *axis_group).to(weight.device)
                quantizer.initialize(weight)
                self.container.add_module(qname, quantizer)
                self.names[key] = qname
            qname = self.names[key]
            self.nodes[key] = _fq_node(self.gm, op, param, qname, self.container.get_submodule(qname))
        op.update_arg(arg, self.nodes[key])

    def activation(self, op: Node, arg: int, spec: QuantSpec, site: tuple) -> None:
        value = op.args[arg]
        if (value, spec) not in self.nodes:
            count = self.seen.get(site, 0)
            self.seen[site] = count + 1
            key = ("activation", *site, count)
            if key not in self.names:
                qname = _unique(self.container, f"{site[0]}_input")
                self.container.add_module(qname, Quantizer(spec, "activation", value.name).to(self.device))
                self.names[key] = qname
            qname = self.names[key]
            self.nodes[(value, spec)] = _fq_node(self.gm, op, value, qname, self.container.get_submodule(qname))
        op.update_arg(arg, self.nodes[(value, spec)])


def _site(node: Node, annotation, arg: int) -> tuple:
    """What identifies an activation quantizer in both modes' graphs: the module (or, for
    functional pooling, the function) and the argument, counted in graph order. Node names do
    not serve: a train-only op before it renumbers them."""
    owner = annotation.module_name if node.op == "call_module" or annotation.signature.kind != "pool" \
        else getattr(node.target, "__name__", str(node.target))
    return (owner or node.name, annotation.signature.kind, arg)


def insert_qdq(gm: GraphModule, *, ctx: PrepareContext) -> PassResult:
    inserter, modified = _Inserter(gm, ctx), False
    for node in list(gm.graph.nodes):
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is None or node.meta.get(_REALIZED):
            continue
        if node.op == "call_module" and annotation.weight is not None:
            node = _functionalize(gm, node)
        sig = annotation.signature
        if annotation.weight is not None:
            spec = annotation.weight
            group = spec.group_size if spec.granularity == "per_group" else 0
            for arg in (sig.weight_arg, *sig.extra_weight_args):
                inserter.weight(node, arg, spec, (spec.axis if spec.axis is not None else -1, group))
        if annotation.activation is not None:
            for arg in (sig.input_arg, *sig.extra_input_args):
                if isinstance(node.args[arg], Node):
                    inserter.activation(node, arg, annotation.activation, _site(node, annotation, arg))
        node.meta[_REALIZED] = True
        modified = True
    return PassResult(gm, modified)
