"""Target lint: configs that will not run, or will not accelerate, on an ONNX Runtime target."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.capture.modes import mode_graph
from qzo_fx.capture.pipeline import list_quantizers, quantizer_containers
from qzo_fx.errors import ExportError
from qzo_fx.quant.op_table import op_signature
from qzo_fx.quant.quantizer import quantizer_of

__all__ = ["lint_target", "resolve_target", "full_range_int8_weights", "float_weights_beside_quantized_inputs"]

# Blocked int4 DequantizeLinear with block size 512 produced zeros in ONNX Runtime.
_BROKEN_BLOCK_SIZES = (512,)
_EXPORT_TARGETS = ("auto", "cpu", "cuda", "tensorrt", "portable")
# Targets whose files meet ONNX Runtime's CPU int8 kernels.
_INT8_CPU_TARGETS = ("cpu", "portable")


def _gpu_providers() -> set[str]:
    try:
        import onnxruntime
    except ImportError:
        return set()
    return set(onnxruntime.get_available_providers()) & {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


def resolve_target(target: str) -> str:
    """``"auto"``: the ONNX Runtime provider this onnxruntime has (TensorRT, CUDA, else CPU)."""
    if target != "auto":
        return target
    gpu = _gpu_providers()
    return "tensorrt" if "TensorrtExecutionProvider" in gpu else "cuda" if gpu else "cpu"


def lint_target(qm: nn.Module, target: str, strict: bool = False) -> list[str]:
    """Findings for ``target``; "auto" applies the rules of the providers this onnxruntime has.
    ``strict`` raises on any finding."""
    if target not in _EXPORT_TARGETS:
        raise ExportError(f"target={target!r} is invalid: allowed {_EXPORT_TARGETS}.")
    resolved = resolve_target(target)
    return _lint(qm, resolved, strict, refuse=target != "auto")


_SATURATION = ("ONNX Runtime's CPU int8 kernels (QLinearConv, QGemm, QLinearMatMul; MLAS U8S8) sum pairs of "
               "uint8 x int8 products in int16 on x86 CPUs without VNNI and saturate when weights use the "
               "full int8 range, so the file computes wrong results there")


def _eval_nodes(qm: nn.Module) -> Iterator[tuple[str, GraphModule, torch.fx.Node]]:
    """``(prefix, part, node)`` over the eval graph of every prepared part (the root, or the
    parts of a partially captured model)."""
    for prefix, _ in quantizer_containers(qm):
        part = qm.get_submodule(prefix) if prefix else qm
        if isinstance(part, GraphModule):
            for node in mode_graph(part, False).nodes:
                yield prefix, part, node


def _named(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def full_range_int8_weights(qm: nn.Module) -> list[str]:
    """Weight quantizers on the full signed 8-bit grid that feed an op whose input is also quantized."""
    found = []
    for prefix, part, node in _eval_nodes(qm):
        hit = quantizer_of(part, node)
        if hit is None or hit[1].role != "weight" or hit[1].spec.qrange[0] > -128:
            continue
        if any(_has_quantized_input(part, user, node) for user in node.users):
            found.append(_named(prefix, hit[0]))
    return sorted(set(found))


def float_weights_beside_quantized_inputs(qm: nn.Module) -> list[str]:
    """Ops that read a float weight (no weight quantizer) from a quantized activation input."""
    found, modules = [], {}
    for prefix, part, node in _eval_nodes(qm):
        if id(part) not in modules:
            modules[id(part)] = dict(part.named_modules())
        signature = op_signature(node, modules[id(part)])  # found: its weight is a bare parameter
        if signature is None or signature.input_arg is None or len(node.args) <= signature.input_arg:
            continue
        source = node.args[signature.input_arg]
        hit = quantizer_of(part, source) if isinstance(source, torch.fx.Node) else None
        if hit is not None and hit[1].role == "activation":
            found.append(_named(prefix, node.name))
    return found


_MATMUL_OPS = ("linear", "matmul", "mm")


def qdq_matmul_weights(qm: nn.Module) -> list[str]:
    """Weight quantizers of linears and matmuls whose inputs are not quantized (weight-only)."""
    found = []
    for prefix, part, node in _eval_nodes(qm):
        hit = quantizer_of(part, node)
        if hit is None or hit[1].role != "weight":
            continue
        consumers = [u for u in node.users if u.op == "call_function"]
        if any(getattr(u.target, "__name__", "").split(".")[0] in _MATMUL_OPS for u in consumers) and \
                not any(_has_quantized_input(part, u, node) for u in consumers):
            found.append(_named(prefix, hit[0]))
    return sorted(set(found))


def _has_quantized_input(gm: GraphModule, op: torch.fx.Node, weight: torch.fx.Node) -> bool:
    for arg in op.all_input_nodes:
        hit = quantizer_of(gm, arg) if arg is not weight else None
        if hit is not None and hit[1].role == "activation" and not hit[1].is_sign:
            return True
    return False


def _lint(qm: nn.Module, target: str, strict: bool, refuse: bool) -> list[str]:
    rows = list_quantizers(qm)
    weights = [q for q in rows if q.role == "weight"]
    activations = [q for q in rows if q.role == "activation"]
    findings, refusals = [], []
    asym = [q.name for q in rows if q.bits > 1 and _asymmetric(qm, q.name)]
    if target == "tensorrt" and asym:
        message = f"TensorRT rejects non-zero zero points (asymmetric quantizers {asym}); use symmetric=True."
        (refusals if refuse else findings).append(message)
    if target == "cuda" and weights and not activations and all(q.bits == 8 for q in weights):
        findings.append("int8 weight-only runs in float on the CUDA provider (storage saving only); "
                        "int4 weight-only (MatMulNBits) or W8A8 on TensorRT accelerates.")
    conv_asym = [q.name for q in weights if q.name in asym and q.granularity == "per_channel"]
    if target == "cpu" and conv_asym:
        findings.append(f"per-channel asymmetric weights {conv_asym} do not fuse to QLinearConv on CPU; "
                        "use symmetric weights for speed.")
    saturating = full_range_int8_weights(qm) if target in _INT8_CPU_TARGETS else []
    if saturating:
        refusals.append(f"weights {saturating} use the full int8 range [-128, 127] beside quantized activations: "
                        f"{_SATURATION}. Prepare with QuantConfig(target='{target}') (7-bit weights, [-64, 63]; "
                        "the default) and train with it, or export for target='tensorrt' or 'cuda'.")
    float_beside = float_weights_beside_quantized_inputs(qm) if activations else []
    if float_beside:
        refusals.append(f"ops {float_beside[:6]}{' ...' if len(float_beside) > 6 else ''} read float weights "
                        "beside quantized activations: ONNX Runtime's default session quantizes such weights to "
                        "int8 itself (its WeightBiasQuantization optimizer), so the file would compute another "
                        "function than the model. Quantize their weights too (QuantConfig(weight_bits=8, "
                        "activation_bits=8)), or leave their inputs in float.")
    qdq_matmuls = qdq_matmul_weights(qm) if target in ("portable", "tensorrt") else []
    if qdq_matmuls:
        findings.append(f"weight-only linears {qdq_matmuls[:4]}{' ...' if len(qdq_matmuls) > 4 else ''} are written "
                        "as DequantizeLinear -> MatMul for this target; ONNX Runtime's CPU session rewrites that "
                        "into MatMulNBits at accuracy level 4 (int8 activations), about one output step off the "
                        "model. For ONNX Runtime export with target='cpu' (MatMulNBits at level 0, exact), or "
                        "open the session with session.qdq_matmulnbits_accuracy_level set to 0.")
    broken = [q.name for q in weights if q.granularity == "per_group" and q.bits <= 4
              and _group_size(qm, q.name) in _BROKEN_BLOCK_SIZES]
    if broken:
        refusals.append(f"blocked int4 weights {broken} use block size 512, which ONNX Runtime miscomputes; "
                        "use group_size 32, 64, 128 or 256.")
    if refusals or (strict and findings):
        raise ExportError(" ".join(refusals + (findings if strict else [])))
    return findings


def _quantizer(qm: nn.Module, name: str):
    # ``name`` is as listed: "<prefix>.<quantizer>" for the parts of a partially captured model.
    prefix, _, own = name.rpartition(".")
    for container_prefix, container in quantizer_containers(qm):
        if container_prefix == prefix and hasattr(container, own):
            return container.get_submodule(own)
    raise KeyError(name)


def _asymmetric(qm: nn.Module, name: str) -> bool:
    return not _quantizer(qm, name).spec.symmetric


def _group_size(qm: nn.Module, name: str) -> int:
    return _quantizer(qm, name).group_size
