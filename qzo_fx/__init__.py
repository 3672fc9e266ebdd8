"""qzo_fx: low-bit quantization-aware training on torch.fx, with STE and zeroth-order
estimators (FOGZO, n-SPSA, ZOQO), exported to ONNX Q/DQ for ONNX Runtime.

Example:
    >>> import torch, qzo_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=2))
    >>> qm(torch.randn(3, 4)).shape
    torch.Size([3, 2])
"""
from __future__ import annotations

from qzo_fx.capture.pipeline import list_quantizers, prepare
from qzo_fx.config import QuantConfig, QuantSpec
from qzo_fx.errors import (
    BatchError,
    CalibrationError,
    CaptureError,
    ConfigError,
    ExampleInputsError,
    ExportError,
    InputError,
    MethodNotKeptError,
    NonFiniteLossError,
    PassError,
    QzoError,
    TrainStepError,
    UnsupportedModelError,
)
from qzo_fx.inspect.examine import ExamineReport, examine
from qzo_fx.inspect.graphs import draw_svg, graph_code, graph_diff, print_tabular, to_networkx
from qzo_fx.quant import ops  # registers the qzo custom ops before any graph refers to them
from qzo_fx.train.codes import to_integer_codes, to_latent_weights
from qzo_fx.train.estimators import FOGZO, NSPSA, STE, ZOQO, ZOSign
from qzo_fx.train.step import StepStats, TrainStep, train_step

__version__ = "0.1.0"

# Export names load on first use: onnx/onnxscript cost half a second that training never needs.
_LAZY = {
    "export_onnx": "qzo_fx.exporters.onnx_export", "ExportResult": "qzo_fx.exporters.onnx_export",
    "onnx_session": "qzo_fx.exporters.runtime",
    "verify_onnx": "qzo_fx.exporters.verify", "ParityReport": "qzo_fx.exporters.verify",
    "export_causal_lm": "qzo_fx.exporters.causal_lm", "generate": "qzo_fx.exporters.generation",
    "write_genai_config": "qzo_fx.exporters.genai",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qzo_fx' has no attribute {name!r}")

__all__ = [
    "prepare", "QuantConfig", "QuantSpec", "list_quantizers", "examine", "ExamineReport",
    "train_step", "TrainStep", "StepStats", "STE", "FOGZO", "NSPSA", "ZOSign", "ZOQO",
    "to_integer_codes", "to_latent_weights",
    "export_onnx", "ExportResult", "verify_onnx", "ParityReport", "onnx_session",
    "export_causal_lm", "generate", "write_genai_config",
    "print_tabular", "graph_code", "graph_diff", "to_networkx", "draw_svg",
    "QzoError", "ConfigError", "CaptureError", "UnsupportedModelError", "PassError",
    "CalibrationError", "TrainStepError", "NonFiniteLossError", "BatchError", "ExportError", "InputError",
    "ExampleInputsError", "MethodNotKeptError", "ops",
]
