"""Error hierarchy: every failure a user can cause is a :class:`QzoError`.

Messages name the place (field, module or node), what is wrong and the way out, so that a
user never has to read a traceback from deep inside torch to fix their input.
"""
from __future__ import annotations

__all__ = [
    "QzoError",
    "ConfigError",
    "CaptureError",
    "UnsupportedModelError",
    "PassError",
    "CalibrationError",
    "TrainStepError",
    "NonFiniteLossError",
    "BatchError",
    "ExportError",
    "InputError",
    "ExampleInputsError",
    "MethodNotKeptError",
]


class QzoError(Exception):
    """Root of all errors raised by qzo_fx for bad input or unsupported models."""


class ConfigError(QzoError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""

    def __init__(self, field: str, value: object, allowed: str, hint: str = "") -> None:
        self.field, self.value, self.allowed = field, value, allowed
        message = f"{field}={value!r} is invalid: allowed {allowed}."
        super().__init__(f"{message} {hint}".strip())


class CaptureError(QzoError):
    """The model could not be captured as a graph by any of the tried methods."""


class UnsupportedModelError(QzoError):
    """The captured graph holds constructs that cannot be quantized as asked."""


class PassError(QzoError):
    """A graph pass failed; the message names the pass and those that ran before it."""


class CalibrationError(QzoError):
    """Scales could not be initialised (missing example inputs, empty tensors...)."""


class TrainStepError(QzoError):
    """The training step cannot be built or run for this model, loss or estimator."""


class NonFiniteLossError(TrainStepError, FloatingPointError):
    """A base or perturbed loss was NaN or infinite."""


class BatchError(TrainStepError):
    """A batch's structure, dtype or shape differs from the batches the step has seen."""


class ExportError(QzoError):
    """Lowering to ONNX or checking the exported file failed."""


class InputError(QzoError, TypeError):
    """A prepared model was called with arguments its captured graph does not take."""


class ExampleInputsError(InputError):
    """The user's float model itself fails on the example inputs given to ``prepare``."""


class MethodNotKeptError(QzoError, AttributeError):
    """A method of the user's model class that the prepared GraphModule does not keep (``generate``)."""
