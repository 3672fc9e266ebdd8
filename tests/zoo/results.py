"""What the zoo records per model and stage."""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

STAGES = ("float_equivalence", "prepare", "eval_deterministic", "w8a8_tracks_float", "shapes", "train_step", "export",
          "onnxruntime", "onnx_reference", "user_model_untouched")

# How a stage failed.
WRONG = "wrong result"      # no exception; a check of the zoo found a wrong or missing result
QZO = "QzoError"            # qzo_fx raised one of its own errors
RAW = "raw exception"       # any other exception escaped qzo_fx (or torch/ONNX Runtime under it)
TIMEOUT = "timeout"         # the model ran past its time budget
ZOO_ERROR = "zoo error"     # the zoo could not build the model or its inputs (a bug of the zoo)


class CheckFailed(Exception):
    """A check of the zoo failed (the library raised nothing)."""


class ZooBug(Exception):
    """The zoo's own case is wrong (e.g. its float model cannot train): not a library failure."""


class ZooTimeout(Exception):
    """The model's time budget ran out."""


@dataclass
class Stage:
    status: str = "not run"   # pass | fail | skip | not run
    kind: str = ""            # WRONG, QZO, RAW or TIMEOUT when failed
    error: str = ""           # first line of the error or of the failed check
    note: str = ""            # what was checked / why skipped
    seconds: float = 0.0
    trace: str = ""
    warnings: list[str] = field(default_factory=list)  # what qzo_fx warned the user about

    @property
    def ok(self) -> bool:
        return self.status == "pass"


@dataclass
class ZooResult:
    name: str
    family: str
    stages: dict[str, Stage] = field(default_factory=lambda: {s: Stage() for s in STAGES})
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0       # wall clock
    cpu_seconds: float = 0.0   # this process's CPU time (all threads): comparable across machine loads

    @property
    def end_to_end(self) -> bool:
        """Every stage passed (an onnx_reference skipped for size counts as not failed; see docs)."""
        return all(s.ok or (name == "onnx_reference" and s.status == "skip") for name, s in self.stages.items())

    def failed(self) -> list[str]:
        return [name for name, s in self.stages.items() if s.status == "fail"]


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:400]}"


def classify(error: BaseException) -> str:
    import qzo_fx

    if isinstance(error, ZooTimeout):
        return TIMEOUT
    if isinstance(error, ZooBug):
        return ZOO_ERROR
    if isinstance(error, CheckFailed):
        return WRONG
    return QZO if isinstance(error, qzo_fx.QzoError) else RAW


def record_failure(stage: Stage, error: BaseException, prefix: Optional[str] = None) -> None:
    stage.status, stage.kind = "fail", classify(error)
    prefix = prefix or getattr(error, "zoo_context", None)
    stage.error = (f"{prefix}: " if prefix else "") + (str(error) if isinstance(error, CheckFailed)
                                                         else first_line(error))
    stage.trace = traceback.format_exc()
