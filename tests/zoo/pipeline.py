"""The zoo's pipeline: what a user's script calls, each call a stage with its own check.

Stages (docs/coverage.md states each check and tolerance in words):

1. float_equivalence: prepare with nothing quantized equals the float model (eval; train too
   for deterministic models).
2. prepare: W8A8 with defaults.
3. eval_deterministic: two eval calls give identical, finite outputs.
4. w8a8_tracks_float: the W8A8 model computes roughly the float model's function.
5. shapes: other batch sizes and sequence lengths the float model takes work in both modes.
6. train_step: a DataLoader epoch (last batch smaller) with the STE, then with FOGZO.
7. export: ``qzo_fx.export_onnx`` with defaults.
8. onnxruntime: the file in a default ``InferenceSession`` against ``qm.eval()``.
9. onnx_reference: the file in ``onnx.reference.ReferenceEvaluator`` against ``qm.eval()``.
10. user_model_untouched: the model passed in is unchanged after every stage.
"""
from __future__ import annotations

import contextlib
import signal
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import qzo_fx
from qzo_fx.capture.copying import copy_model
from tests.zoo import checks, onnx_check, training
from tests.zoo.cases import Case, Entry
from tests.zoo.results import STAGES, ZOO_ERROR, Stage, ZooResult, ZooTimeout, record_failure

W8A8 = dict(weight_bits=8, activation_bits=8)
BUDGET_S = 300  # per model; a model past it fails the running stage as a timeout


@contextlib.contextmanager
def time_budget(seconds: int) -> Iterator[None]:
    """Raise :class:`ZooTimeout` in the main thread after ``seconds`` (SIGALRM; no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise ZooTimeout(f"the model ran past its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def library_warnings(caught: list) -> list[str]:
    """The distinct warnings qzo_fx gave the user during a stage (attributed to the library or, by
    ``stacklevel``, to the caller), first line each."""
    places = ("/qzo_fx/", "/passes/", "/exporters/", "/tests/zoo/")
    found = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0][:300] if str(w.message).strip() else ""
        if any(p in str(w.filename) for p in places) and text and text not in found:
            found.append(f"{w.category.__name__}: {text}")
    return found[:5]


class Run:
    """One model through the stages; each stage records itself in ``result``."""

    def __init__(self, name: str, entry: Entry) -> None:
        self.result = ZooResult(name, entry.family)
        torch.manual_seed(0)
        self.case: Case = entry.build()
        self.model = self.case.model                   # the user's model: only qzo_fx sees it
        self.float_model = copy_model(self.model)   # the zoo's own copy for float references
        self.args, self.kwargs = self.case.inputs()
        self.fingerprint = checks.fingerprint(self.model)
        self.qm = None
        self.onnx_path = None
        self.tmp = tempfile.TemporaryDirectory()  # the exported file; removed by run_pipeline

    def stage(self, name: str, body: Callable[[Stage], Any]) -> bool:
        stage, start = self.result.stages[name], time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    body(stage)
                finally:
                    stage.warnings = library_warnings(caught)
            if stage.status == "not run":
                stage.status = "pass"
        except ZooTimeout:
            record_failure(stage, ZooTimeout("time budget ran out"))
            raise
        except Exception as error:  # recorded, not raised: the report is the product here
            record_failure(stage, error)
        finally:
            stage.seconds = time.perf_counter() - start
            self._check_untouched(name)
        return stage.ok

    def _check_untouched(self, after: str) -> None:
        changes = checks.changes(self.fingerprint, checks.fingerprint(self.model))
        untouched = self.result.stages["user_model_untouched"]
        if changes and untouched.status != "fail":
            untouched.status, untouched.kind = "fail", "wrong result"
            untouched.error = f"after {after}: " + "; ".join(changes[:3])

    def prepare(self, config: qzo_fx.QuantConfig):
        return qzo_fx.prepare(self.model, config, example_inputs=self.args, example_kwargs=self.kwargs or None)

    # ------------------------------------------------------------------ stages
    def float_equivalence(self, stage: Stage) -> None:
        qm = self.prepare(qzo_fx.QuantConfig(weight=None))
        stage.note = checks.float_equivalence(qm, self.float_model, self.case, self.args, self.kwargs, self.result.info)

    def prepare_w8a8(self, stage: Stage) -> None:
        self.qm = self.prepare(qzo_fx.QuantConfig(**W8A8))
        stage.note = checks.describe_prepared(self.qm, self.model, self.result.info)

    def eval_deterministic(self, stage: Stage) -> None:
        checks.eval_deterministic(self.qm, self.float_model, self.args, self.kwargs)

    def w8a8_tracks_float(self, stage: Stage) -> None:
        stage.note = checks.w8a8_tracks_float(self.qm, self.float_model, self.args, self.kwargs, self.result.info)

    def shapes(self, stage: Stage) -> None:
        stage.note = checks.shapes(self.qm, self.float_model, self.case)

    def train_step(self, stage: Stage) -> None:
        stage.note = training.train(self.qm, self.float_model, self.case, self.result.info)

    def export(self, stage: Stage) -> None:
        if not self.result.stages["train_step"].ok:  # export what prepare gives, untouched by a failed step
            self.qm = self.prepare(qzo_fx.QuantConfig(**W8A8))
            stage.note = "exported the prepared model (training failed). "
        self.qm.eval()
        path = str(Path(self.tmp.name) / "model.onnx")
        exported = qzo_fx.export_onnx(self.qm, self.args, path, example_kwargs=self.kwargs or None)
        self.onnx_path = path
        self.result.info["onnx"] = dict(bytes=Path(path).stat().st_size, dynamic_batch=exported.dynamic_batch)
        stage.note += f"opset {exported.opset}, dynamic batch: {'yes' if exported.dynamic_batch else 'no'}"

    def onnx_stages(self) -> None:
        sets: list = []
        self.stage("onnxruntime", lambda s: onnx_check.onnxruntime_stage(
            s, self.qm, self.model, self.case, self.onnx_path, self.args, self.kwargs, self.result.info, sets))
        if sets:  # the file loaded and ran: check what it means
            self.stage("onnx_reference", lambda s: onnx_check.reference_stage(s, self.onnx_path, sets,
                                                                              self.result.info))

    def run(self) -> ZooResult:
        self.stage("float_equivalence", self.float_equivalence)
        if self.stage("prepare", self.prepare_w8a8):
            self.stage("eval_deterministic", self.eval_deterministic)
            self.stage("w8a8_tracks_float", self.w8a8_tracks_float)
            self.stage("shapes", self.shapes)
            self.stage("train_step", self.train_step)
            if self.stage("export", self.export):
                self.onnx_stages()
        untouched = self.result.stages["user_model_untouched"]
        if untouched.status != "fail":
            untouched.status, untouched.note = "pass", "module tree, modes, parameters, buffers, ties"
        return self.result


def run_pipeline(name: str, entry: Entry, budget_s: int = BUDGET_S) -> ZooResult:
    """Run one zoo model through every stage; never raises (a build failure is recorded too)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = ZooResult(name, entry.family)
    try:
        with time_budget(budget_s):
            try:
                run = Run(name, entry)
            except Exception as error:  # a zoo bug, not a library failure: said so in the row
                record_failure(result.stages[STAGES[0]], error)
                result.stages[STAGES[0]].kind = ZOO_ERROR
                result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
                return result
            result = run.result
            try:
                run.run()
            finally:
                run.tmp.cleanup()
    except ZooTimeout:
        pass  # recorded in the stage that was running
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return result
