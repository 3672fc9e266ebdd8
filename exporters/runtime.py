"""ONNX Runtime sessions on the best provider that really loads: TensorRT -> CUDA -> CPU."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import onnx

from qzo_fx.errors import ExportError

__all__ = ["onnx_session", "has_low_bit_qdq", "PROVIDER_ORDER", "TARGETS"]

log = logging.getLogger("qzo_fx")
PROVIDER_ORDER = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}
TARGETS = ("auto", "cpu", "cuda", "tensorrt")


def _ort():
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError("onnxruntime is not installed: pip install 'qzo-fx[gpu]' (onnxruntime-gpu) "
                          "or 'qzo-fx[cpu]' (onnxruntime).") from error
    return onnxruntime


def has_low_bit_qdq(model) -> bool:
    """True if the file stores INT4/UINT4 values or clips Q outputs to a sub-8-bit grid."""
    low = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    if any(init.data_type in low for init in model.graph.initializer):
        return True
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return any(n.op_type == "Clip" and producers.get(n.input[0]) == "QuantizeLinear" for n in model.graph.node)


def onnx_session(path: Union[str, Path, bytes], target: str = "auto", threads: int = 0,
                 exact_bias: Optional[bool] = None, config: Optional[dict[str, str]] = None, exact: bool = False):
    """An ``onnxruntime.InferenceSession`` on the first provider of ``target`` that loads.

    A provider can be listed by onnxruntime-gpu and still fail to load (missing CUDA or TensorRT
    libraries): ONNX Runtime then silently runs on CPU. This checks the providers the session
    really got and logs one line when it fell back.

    ``exact``: only graph rewrites that keep the ONNX semantics (no fusion into integer kernels,
    no bias requantization): what the file means, for parity checks; slower.
    ``config``: extra session config entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``).
    ``exact_bias``: ONNX Runtime's ``WeightBiasQuantization`` rounds float biases of Q/DQ
    Gemm/Conv to int32 at scale ``s_act * s_weight``; below 8 bits that step is coarse and the
    result departs from the trained model. ``None`` disables it for files with sub-8-bit types.

    Example:
        >>> sess = onnx_session("model.onnx")          # doctest: +SKIP
        >>> sess.get_providers()[0]                     # doctest: +SKIP
        'CPUExecutionProvider'
    """
    if target not in TARGETS:
        raise ExportError(f"target={target!r} is invalid: allowed {TARGETS}.")
    ort = _ort()
    available = set(ort.get_available_providers())
    wanted = PROVIDER_ORDER["tensorrt" if target == "auto" else target]
    providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if exact
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # Exact int4 results from fused MatMulNBits kernels (accuracy level 1 = fp32 compute).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    model = str(path) if isinstance(path, Path) else path
    if exact:
        exact_bias = True
    if exact_bias is None:
        exact_bias = has_low_bit_qdq(onnx.load(model) if isinstance(model, str) else onnx.load_from_string(model))
    disabled = ["WeightBiasQuantization"] if exact_bias else []
    session = ort.InferenceSession(model, sess_options=options, providers=providers, disabled_optimizers=disabled)
    running = session.get_providers()[0]
    if running != providers[0]:
        # Listed by this onnxruntime build, yet its libraries (CUDA, cuDNN, TensorRT) did not load.
        log.warning("qzo_fx: %s is listed but did not load; running on %s", providers[0], running)
    elif target in ("cuda", "tensorrt") and running != wanted[0]:
        log.warning("qzo_fx: %s is not in this onnxruntime build (pip install 'qzo-fx[gpu]'); running on %s",
                    wanted[0], running)
    return session
