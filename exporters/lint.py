"""Target lint: configs that will not run, or will not accelerate, on an ONNX Runtime target."""
from __future__ import annotations

import torch.nn as nn

from qzo_fx.errors import ExportError
from qzo_fx.capture.pipeline import list_quantizers, quantizer_containers

__all__ = ["lint_target"]

# Blocked int4 DequantizeLinear with block size 512 produced zeros in ONNX Runtime.
_BROKEN_BLOCK_SIZES = (512,)


def _gpu_providers() -> set[str]:
    try:
        import onnxruntime
    except ImportError:
        return set()
    return set(onnxruntime.get_available_providers()) & {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


def lint_target(qm: nn.Module, target: str, strict: bool = False) -> list[str]:
    """Findings for ``target``; "auto" applies the rules of the providers this onnxruntime has.
    ``strict`` raises on any finding."""
    if target == "auto":
        gpu = _gpu_providers()
        target = "tensorrt" if "TensorrtExecutionProvider" in gpu else "cuda" if gpu else "cpu"
        return _lint(qm, target, strict, refuse=False)
    return _lint(qm, target, strict, refuse=True)


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
