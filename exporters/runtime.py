"""ONNX Runtime sessions as users open them (default options), on the best provider that really loads."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from qzo_fx.errors import ExportError

__all__ = ["onnx_session", "available_targets", "PROVIDER_ORDER", "TARGETS"]

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


def onnx_session(path: Union[str, Path, bytes], target: str = "auto", threads: int = 0,
                 config: Optional[dict[str, str]] = None):
    """An ``onnxruntime.InferenceSession`` with default options on the first provider of ``target`` that loads.

    The session is the one users open (``InferenceSession(path)``: every graph optimization on,
    integer kernels fused); only the providers are chosen. A provider can be listed by
    onnxruntime-gpu and still fail to load (missing CUDA or TensorRT libraries): ONNX Runtime
    then silently runs on CPU. This checks the providers the session really got and logs one
    line when it fell back.

    Args:
        path: an ``.onnx`` file or its serialized bytes.
        target: "auto" (TensorRT -> CUDA -> CPU, whichever loads), "cpu", "cuda" or "tensorrt".
        threads: intra-op threads (0: ONNX Runtime's default).
        config: extra session config entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``).

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
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    model = str(path) if isinstance(path, Path) else path
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    running = session.get_providers()[0]
    if running != providers[0]:
        # Listed by this onnxruntime build, yet its libraries (CUDA, cuDNN, TensorRT) did not load.
        log.warning("qzo_fx: %s is listed but did not load; running on %s", providers[0], running)
    elif target in ("cuda", "tensorrt") and running != wanted[0]:
        log.warning("qzo_fx: %s is not in this onnxruntime build (pip install 'qzo-fx[gpu]'); running on %s",
                    wanted[0], running)
    return session


def available_targets() -> list[str]:
    """The ONNX Runtime targets whose provider this onnxruntime build lists: "cpu" always,
    "cuda" / "tensorrt" where present."""
    available = set(_ort().get_available_providers())
    gpu = [t for t in ("cuda", "tensorrt") if PROVIDER_ORDER[t][0] in available]
    return ["cpu"] + gpu
