"""OpenVINO's CPU runtime as a second reader of exported files, behind ONNX Runtime's session API.

A file that only one runtime reads correctly is not portable: :func:`qzo_fx.verify_onnx` with
``runtime="openvino"`` runs the file in OpenVINO (``openvino.Core().compile_model(path, "CPU")``)
through this adapter, rounding ties followed the same way as for ONNX Runtime.

OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it (AVX512-BF16, AMX) and
quantizes the activations of MatMuls with compressed (int4/int8) weights on the fly
(``DYNAMIC_QUANTIZATION_GROUP_SIZE``): both trade accuracy for speed whatever the file says.
:data:`EXACT_CONFIG` asks for f32 arithmetic and no dynamic quantization, so that what is compared
is the file; ``config={}`` gives the plugin's defaults.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from qzo_fx.errors import ExportError

__all__ = ["OpenVinoSession", "EXACT_CONFIG"]

EXACT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


@dataclass
class _Value:
    name: str
    shape: list  # static sizes as ints, dynamic ones as None (as onnxruntime's NodeArg.shape)


def _value(port) -> _Value:
    dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return _Value(port.get_any_name(), dims)


class OpenVinoSession:
    """``run`` / ``get_inputs`` / ``get_outputs`` / ``get_providers`` of an OpenVINO compiled model.

    Example:
        >>> session = OpenVinoSession("model.onnx")                       # doctest: +SKIP
        >>> session.run(None, {"input": x})[0].shape                       # doctest: +SKIP
    """

    def __init__(self, model: Union[str, Path, bytes], config: Optional[dict[str, str]] = None) -> None:
        try:
            import openvino as ov
        except ImportError as error:
            raise ExportError("openvino is not installed: pip install 'qzo-fx[openvino]'.") from error
        core = ov.Core()
        if isinstance(model, bytes):  # OpenVINO reads ONNX from a path
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "model.onnx").write_bytes(model)
                read = core.read_model(str(Path(folder) / "model.onnx"))
        else:
            read = core.read_model(str(model))
        self.compiled = core.compile_model(read, "CPU", dict(EXACT_CONFIG if config is None else config))
        self._inputs = [_value(i) for i in self.compiled.inputs]
        self._outputs = [_value(o) for o in self.compiled.outputs]

    def get_inputs(self) -> list[_Value]:
        return self._inputs

    def get_outputs(self) -> list[_Value]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def run(self, names: Optional[list[str]], feeds: dict[str, Any]) -> list[np.ndarray]:
        results = self.compiled({name: np.asarray(value) for name, value in feeds.items()})
        by_name = {o.get_any_name(): results[o] for o in self.compiled.outputs}
        return [by_name[n] for n in (names or [o.name for o in self._outputs])]
