"""The zoo's checks of a prepared model against the float model (stages 1-5 and the last)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import qzo_fx
from qzo_fx.capture.copying import copy_model
from tests.zoo.cases import Case, stochastic_reasons
from tests.zoo.outputs import compare, floating, identical, relative_error
from tests.zoo.outputs import shapes as output_shapes
from tests.zoo.results import CheckFailed

FLOAT_RTOL = 1e-5
WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)


# ---------------------------------------------------------------- the user's model, unchanged
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Module tree, modes, hooks and attributes of every module; every parameter and buffer
    (values, requires_grad, .grad set or not) and which parameters are one tensor (ties)."""
    modules = [(name, type(m).__qualname__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                len(m._backward_hooks), tuple(sorted(vars(m))))
               for name, m in model.named_modules(remove_duplicate=False)]
    params = list(model.named_parameters(remove_duplicate=False))
    groups: dict[int, list[str]] = {}
    for name, p in params:
        groups.setdefault(id(p), []).append(name)
    return {"modules": modules,
            "tensors": {f"parameter {n}": p.detach().clone() for n, p in params}
            | {f"buffer {n}": b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
            "flags": {n: (p.requires_grad, p.grad is None) for n, p in params},
            "ties": sorted(sorted(g) for g in groups.values())}


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    found = []
    if before["modules"] != after["modules"]:
        diff = [f"{a[0] or 'root'}: {a[1:]} -> {b[1:]}" for a, b in zip(before["modules"], after["modules"]) if a != b]
        found.append("module tree/modes/hooks/attributes changed: " + (", ".join(diff[:2]) or "modules added/removed"))
    if before["tensors"].keys() != after["tensors"].keys():
        found.append("the set of parameters and buffers changed")
    else:
        found += [f"{k} changed" for k, v in before["tensors"].items()
                  if not (v.shape == after["tensors"][k].shape and torch.equal(v, after["tensors"][k]))][:3]
    if before["flags"] != after["flags"]:
        found.append("requires_grad or .grad of a parameter changed")
    if before["ties"] != after["ties"]:
        found.append("tied parameters were untied or re-tied")
    return found


# ---------------------------------------------------------------- stage 1: nothing quantized
def float_equivalence(qm: nn.Module, float_model: nn.Module, case: Case, args, kwargs, info: dict) -> str:
    """Eval mode always; train mode for deterministic models. Both are checked before failing."""
    ref = copy_model(float_model).eval()
    qm.eval()
    with torch.no_grad():
        problems = [f"eval mode: {p}" for p in compare(ref(*args, **kwargs), qm(*args, **kwargs), FLOAT_RTOL)]
    reasons = stochastic_reasons(float_model, case)
    ref = copy_model(float_model).train()
    with torch.no_grad():
        torch.manual_seed(0)
        first = ref(*args, **kwargs)
        torch.manual_seed(1)
        if not identical(first, ref(*args, **kwargs)):
            reasons.append("train-mode outputs differ between seeds")
    info["stochastic"] = reasons
    if reasons:
        note = f"train mode not compared (stochastic: {_summary(reasons)})"
    else:
        qm.train()
        with torch.no_grad():
            torch.manual_seed(0)
            expected = copy_model(float_model).train()(*args, **kwargs)
            torch.manual_seed(0)
            problems += [f"train mode: {p}" for p in compare(expected, qm(*args, **kwargs), FLOAT_RTOL)]
        note = "train mode compared"
    if problems:
        raise CheckFailed("; ".join(problems[:4] + ([note] if reasons else [])))
    return f"eval mode equal; {note}"


def _summary(reasons: list[str]) -> str:
    return ", ".join(reasons[:2]) + (f" and {len(reasons) - 2} more" if len(reasons) > 2 else "")


# ---------------------------------------------------------------- stage 2: W8A8
def describe_prepared(qm: nn.Module, model: nn.Module, info: dict) -> str:
    quantizers = qzo_fx.list_quantizers(qm)
    weights = sum(q.role == "weight" for q in quantizers)
    activations = sum(q.role == "activation" for q in quantizers)
    layers = sum(isinstance(m, WEIGHT_MODULES) for m in model.modules())
    capture = "partial" if hasattr(qm, "qzo_partial") else getattr(qm.meta.get("qzo.capture"), "method", "?")
    info.update(capture=capture, weight_quantizers=weights, activation_quantizers=activations, layers=layers)
    if not weights or not activations:
        raise CheckFailed(f"W8A8 asked, but {weights} weight and {activations} activation quantizers were inserted "
                          f"({layers} Linear/Conv modules in the model)")
    return f"{capture}; {weights} weight / {activations} activation quantizers; {layers} Linear/Conv modules"


# ---------------------------------------------------------------- stage 3
def eval_deterministic(qm: nn.Module, float_model: nn.Module, args, kwargs) -> None:
    with torch.no_grad():
        qm.eval()
        first = qm(*args, **kwargs)
        qm.eval()
        second = qm(*args, **kwargs)
        expected = copy_model(float_model).eval()(*args, **kwargs)
    if not identical(first, second):
        raise CheckFailed("two qm.eval() calls on the same input give different outputs")
    for i, (g, e) in enumerate(zip(floating(second), floating(expected))):
        if torch.isfinite(e).all() and not torch.isfinite(g).all():
            raise CheckFailed(f"floating output #{i} has NaN/inf where the float model's is finite")


# ---------------------------------------------------------------- stage 4
W8A8_RTOL = 0.5


def _running_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats for m in model.modules())


def _weight_noise_copy(model: nn.Module, seed: int = 5) -> nn.Module:
    """A copy of the float model whose weights (parameters of 2+ dimensions) carry uniform noise
    of half a 7-bit step per output channel: what rounding them to the W8A8 grid moves them by, drawn
    independently of qzo_fx. How far that moves the output measures the network's own sensitivity."""
    noisy = copy_model(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() >= 2 and p.is_floating_point():
                step = p.abs().flatten(1).amax(1).clamp_min(1e-12) / 63
                shape = (-1,) + (1,) * (p.dim() - 1)
                p.add_((torch.rand(p.shape, generator=gen) - 0.5) * step.reshape(shape))
    return noisy


def w8a8_tracks_float(qm: nn.Module, float_model: nn.Module, args, kwargs, info: dict) -> str:
    """The W8A8 model computes roughly the float model's function: no floating output all zero
    where the float model's is not, and each within max-norm relative error max(0.5, 3 x the
    network's own sensitivity) of the float model's, where the sensitivity is how far the float
    model moves when its weights carry noise of the size W8A8 rounding has (random-init networks
    with train-mode BatchNorm on tiny batches move by tens of percent under it).

    Compared in train mode (same random state for all: dropout draws alike) and, for models
    without BatchNorm running statistics, in eval mode too. At random init running statistics (0
    and 1) describe no activation: eval-mode activations are orders of magnitude off the training
    ones; calibration takes the training range (passes/prepare/calibrate.py), and the eval mode of
    such a model is compared against the file by the ONNX stages."""
    modes = (True,) if _running_statistics(float_model) else (True, False)
    worst, sensitivity = [], []
    for training in modes:
        with torch.no_grad():
            outputs = []
            for model in (float_model, _weight_noise_copy(float_model), qm):
                torch.manual_seed(11)
                outputs.append(floating(copy_model(model).train(training)(*args, **kwargs)))
        expected, noisy, got = outputs
        mode = "train" if training else "eval"
        for i, (e, n, g) in enumerate(zip(expected, noisy, got)):
            if e.shape != g.shape:
                continue
            err, sens = relative_error(e, g), relative_error(e, n)
            worst.append(err)
            sensitivity.append(sens)
            if e.abs().max() > 0 and not g.abs().max() > 0:
                raise CheckFailed(f"{mode} mode: floating output #{i} is all zero, the float model's reaches "
                                  f"{float(e.abs().max()):.3g}")
            if not err <= max(W8A8_RTOL, 3 * sens):
                raise CheckFailed(f"{mode} mode: floating output #{i}: relative error {err:.3g} against the float "
                                  f"model > max({W8A8_RTOL}, 3 x {sens:.3g} under weight noise)")
    info["w8a8_rel_error"] = max(worst, default=None)
    info["float_weight_noise_rel_error"] = max(sensitivity, default=None)
    compared = " and ".join("train" if t else "eval" for t in modes)
    if not worst:
        return "no comparable floating output"
    return (f"max relative error {max(worst):.3g}; the float model under weight noise moves {max(sensitivity):.3g} "
            f"({compared} mode)")


# ---------------------------------------------------------------- stage 5
def shape_variants(case: Case) -> list[tuple[str, int, Any]]:
    b, s = case.batch, case.seq
    variants = [(f"batch {b + 1}", b + 1, s), ("batch 1", 1, s)]
    if case.has_sequence:
        variants.append((f"sequence {s + 3}", b, s + 3))
    return variants


def shapes(qm: nn.Module, float_model: nn.Module, case: Case) -> str:
    done, rejected = [], []
    references = {training: copy_model(float_model).train(training) for training in (False, True)}
    for label, batch, seq in shape_variants(case):
        args, kwargs = case.inputs(batch, seq, seed=2)
        for training in (False, True):
            where = f"{label}, {'train' if training else 'eval'}"
            try:
                with torch.no_grad():
                    expected = references[training](*args, **kwargs)
            except Exception:
                rejected.append(where)  # the float model does not take it either
                continue
            qm.train(training)
            try:
                with torch.no_grad():
                    got = qm(*args, **kwargs)
            except Exception as error:
                error.zoo_context = where
                raise
            wrong = _shape_mismatches(output_shapes(expected), output_shapes(got))
            if wrong:
                raise CheckFailed(f"{where}: " + "; ".join(wrong[:3]))
            done.append(where)
    return f"{len(done)} passed ({'; '.join(done)})" + (f"; not valid for the float model: {', '.join(rejected)}"
                                                       if rejected else "")


def _shape_mismatches(expected: list, got: list) -> list[str]:
    """Outputs of the prepared model whose shape differs from the float model's output at the same
    path. Outputs it lacks are float_equivalence's finding (structure), not counted again here."""
    ref = dict(expected)
    return [f"{path} {list(shape)} (float model: {list(ref[path]) if path in ref else 'no such output'})"
            for path, shape in got if ref.get(path) != shape]
