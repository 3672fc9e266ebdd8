"""prepare -> STE step -> FOGZO step -> ONNX export -> ONNX Runtime parity, stage by stage."""
from __future__ import annotations

import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

import qzo_fx
from qzo_fx.capture.modes import set_mode

STAGES = ("prepare", "ste_step", "fogzo_step", "export", "parity")
CONFIG = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


@dataclass
class ZooResult:
    name: str
    family: str
    passed: list[str] = field(default_factory=list)
    failed_stage: str = ""
    error: str = ""
    qzo_error: bool = True
    capture: str = ""
    quantizers: int = 0
    seconds: float = 0.0
    raw_steps: float = float("nan")   # output difference without following ties
    ties: int = 0                     # activation codes that were rounding ties
    codes: int = 0
    user_model_untouched: bool = True  # the model passed to prepare, after every stage

    @property
    def ok(self) -> bool:
        return not self.failed_stage


def loss_of(output) -> torch.Tensor:
    """A generic scalar loss: mean square of every floating output tensor."""
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves and hasattr(output, "values"):
        leaves = [t for t in output.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)


def _fingerprint(model: torch.nn.Module) -> tuple:
    """What must survive prepare/train/export unchanged: module tree, modes and every tensor."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return [(n, type(m).__name__, m.training) for n, m in model.named_modules()], tensors


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def run_pipeline(name: str, family: str, factory) -> ZooResult:
    result, start = ZooResult(name, family), time.perf_counter()
    model, args, kwargs = factory()
    before = _fingerprint(model)
    stage = "prepare"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qzo_fx.prepare(model, CONFIG, example_inputs=args, example_kwargs=kwargs)
            result.capture = "partial" if hasattr(qm, "qzo_partial") else qm.meta["qzo.capture"].method
            result.quantizers = len(qzo_fx.list_quantizers(qm))
            result.passed.append(stage)
            loss_fn = lambda m, batch: loss_of(m(*batch[0], **batch[1]))
            for stage, estimator in (("ste_step", qzo_fx.STE()), ("fogzo_step", qzo_fx.FOGZO(seed=0, total_steps=2))):
                set_mode(qm, True)
                qzo_fx.train_step(qm, loss_fn, estimator, strategy="auto")((args, kwargs))
                result.passed.append(stage)
            stage = "export"
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.onnx"
                qzo_fx.export_onnx(qm, args, path, target="cpu", dynamic_batch=False, example_kwargs=kwargs)
                result.passed.append(stage)
                stage = "parity"
                report = qzo_fx.verify_onnx(qm, path, args, kwargs=kwargs)
                result.raw_steps, result.ties, result.codes = report.raw_steps, report.ties, report.codes
                if not report.ok:
                    raise qzo_fx.ExportError(f"parity failed: {report}")
                result.passed.append(stage)
    except Exception as error:  # recorded, not raised: the report is the product here
        result.failed_stage = stage
        result.qzo_error = isinstance(error, qzo_fx.QzoError)
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        result.trace = traceback.format_exc()
    result.user_model_untouched = _same(before, _fingerprint(model))
    result.seconds = time.perf_counter() - start
    return result


AO_STAGES = ("prepare", "ste_step", "export", "parity")


def run_torch_ao(name: str, family: str, factory) -> ZooResult:
    """The same zoo through torch.ao's (deprecated) FX QAT: prepare_qat_fx -> step -> convert -> ONNX."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    import onnxruntime as ort
    import numpy as np

    result, start = ZooResult(name, family), time.perf_counter()
    model, args, kwargs = factory()
    stage = "prepare"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), args)
            result.passed.append(stage)
            stage = "ste_step"
            loss_of(qat(*args, **kwargs)).backward()
            result.passed.append(stage)
            stage = "export"
            converted = convert_fx(qat.eval())
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ao.onnx"
                try:  # torch.ao's converted models export with the TorchScript exporter
                    torch.onnx.export(converted, args, str(path), dynamo=False, kwargs=kwargs or None)
                except Exception:
                    torch.onnx.export(converted, args, str(path), dynamo=True, external_data=False)
                result.passed.append(stage)
                stage = "parity"
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
                with torch.no_grad():
                    ref = [t for t in tree_leaves(converted(*args, **kwargs)) if isinstance(t, torch.Tensor)][0].numpy()
                step = max(float(np.abs(ref).max()), 1e-12) / 127
                if float(np.abs(got - ref).max()) > step:
                    raise RuntimeError(f"parity {float(np.abs(got - ref).max()) / step:.2f} steps")
                result.passed.append(stage)
    except Exception as error:
        result.failed_stage = stage
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    result.seconds = time.perf_counter() - start
    return result
