"""``prepare``: the user's model in, a trainable fake-quantized GraphModule out."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Optional, Sequence

import torch.nn as nn
from torch.fx import GraphModule

from qzo_fx.capture.call_errors import LOW_PRECISION
from qzo_fx.capture.copying import copy_model
from qzo_fx.capture.coverage import unquantized_weights
from qzo_fx.capture.eager_check import eager_failure
from qzo_fx.capture.modal import each_mode
from qzo_fx.capture.partial import prepare_partially
from qzo_fx.capture.tracing import CaptureReport, DynamicShapes
from qzo_fx.capture.tracing import capture as capture_model
from qzo_fx.config import QuantConfig
from qzo_fx.context import QUANT_CONTAINER, PrepareContext
from qzo_fx.errors import CaptureError, ConfigError, ExampleInputsError, QzoError
from qzo_fx.example_inputs import positional_inputs
from qzo_fx.pass_infra import Pass, PassInstrument, PassManager
from qzo_fx.passes.prepare.affine_eval_batchnorm import affine_eval_batchnorm
from qzo_fx.passes.prepare.annotate import annotate
from qzo_fx.passes.prepare.calibrate import calibrate
from qzo_fx.passes.prepare.cleanup import cleanup
from qzo_fx.passes.prepare.fold_eval_batchnorm import fold_eval_batchnorm
from qzo_fx.passes.prepare.insert_qdq import insert_qdq
from qzo_fx.passes.prepare.quantize_bias import quantize_bias
from qzo_fx.quant.quantizer import Quantizer, QuantizerInfo

__all__ = ["prepare", "PREPARE_PIPELINE", "list_quantizers", "quantizer_containers"]

# Graph passes run on the graph of each mode (train and eval, where they differ); quantizers are
# shared between the two.
PREPARE_PIPELINE = (
    Pass("annotate", each_mode(annotate), "resolve the config into a spec per quantizable op (policy)"),
    Pass("insert_qdq", each_mode(insert_qdq), "realize specs as qzo.fake_quant nodes with their quantizers"),
    Pass("calibrate", calibrate, "set activation scales from the example inputs, seen in both modes"),
    Pass("quantize_bias", each_mode(quantize_bias),
         "round biases of integer-kernel ops to int32 at s_x*s_w, as ORT does"),
    Pass("fold_eval_batchnorm", fold_eval_batchnorm, "eval graph: BatchNorms computed folded, as the file"),
    Pass("affine_eval_batchnorm", affine_eval_batchnorm,
         "eval graph: BatchNorms that fold into nothing as one multiply-add, as every runtime rounds it"),
    Pass("cleanup", each_mode(cleanup), "drop reads that functionalization left unused"),
)


def prepare(model: nn.Module, config: Optional[QuantConfig] = None,
            example_inputs: Optional[Sequence[Any]] = None, *,
            example_kwargs: Optional[dict[str, Any]] = None, capture: str = "auto",
            dynamic_shapes: DynamicShapes = "auto", instruments: Sequence[PassInstrument] = ()) -> nn.Module:
    """Capture ``model`` and insert fake-quantization with straight-through gradients.

    The user's model is copied first and never changed. The result is a ``GraphModule`` (a
    :class:`~qzo_fx.capture.modal.PreparedModel`; where only parts of the model could be
    captured, the model's own root holding prepared parts, see ``qm.qzo_partial``) that
    trains with any torch optimizer (the STE gives the latent weights their gradients) and
    behaves like the model: ``train()`` / ``eval()`` switch dropout, BatchNorm and every
    ``if self.training:`` branch (the model is captured in both modes), it takes other batch
    sizes and sequence lengths, and it starts in the mode the model was in.

    Args:
        model: any ``nn.Module``.
        config: what to quantize; default 8-bit per-channel weights, float activations.
        example_inputs: positional inputs (a tuple, or one tensor); needed for activation
            calibration and torch.export.
            Forward arguments that are None here (or left at a None default) are captured as
            the constant None.
        example_kwargs: keyword inputs for the same.
        capture: ``"auto"`` (symbolic trace, then torch.export, then partial capture),
            ``"symbolic"`` or ``"export"``.
        dynamic_shapes: for torch.export captures: ``"auto"`` (the batch, the sequence of token
            inputs and every dimension of 2-D and 3-D float inputs that the weights do not fix
            are dynamic; static, with a warning, if the model cannot have them),
            ``False`` (the example's shapes only), or a ``torch.export`` ``dynamic_shapes`` spec.
            Symbolic traces take any shape the code does.
        instruments: pass instruments (e.g. ``PrintAfterPass()``, ``DumpPasses(dir)``).

    Example:
        >>> import torch, qzo_fx
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=2))
        >>> [q.bits for q in qzo_fx.list_quantizers(qm)]
        [2, 2]
    """
    if not isinstance(model, nn.Module):
        raise QzoError(f"prepare() takes an nn.Module, got {type(model).__name__}.")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise QzoError(f"config must be a qzo_fx.QuantConfig, got {type(config).__name__}.")
    _refuse_low_precision(model)
    args = positional_inputs(example_inputs, "prepare")
    kwargs = dict(example_kwargs or {})
    if args is None and kwargs:
        args = ()  # keyword inputs only (model(**batch)): examples all the same
    try:
        copied = copy_model(model)
    except Exception as error:  # a module holding an uncopyable object (a lock, a file, a generator)
        raise CaptureError(f"prepare() works on a copy of {type(model).__name__}, and copy.deepcopy failed: "
                           f"{type(error).__name__}: {error}. Make the module copyable (e.g. drop the offending "
                           "attribute or define __deepcopy__).") from error
    try:
        prepared = _capture_and_prepare(model, copied, config, args, kwargs, capture, dynamic_shapes, instruments)
    except Exception as error:
        # Tracing and calibration run the model: an example it cannot take fails deep inside them.
        why = eager_failure(model, args, kwargs)
        if why is None:
            raise
        raise ExampleInputsError(
            f"{type(model).__name__} itself fails on the example inputs given to prepare(), before anything "
            f"is quantized: {why}. Pass example_inputs/example_kwargs that the float model takes (check their "
            "shapes and dtypes: model(*example_inputs, **example_kwargs) must run).") from error
    if getattr(model, "config", None) is not None and not hasattr(prepared, "config"):
        # A Hugging Face model's configuration: what saving beside the weights (QzoTrainer) and
        # reloading them into the model's class (from_pretrained) need.
        prepared.config = copy.deepcopy(model.config)
    return prepared


def _capture_and_prepare(model: nn.Module, copied: nn.Module, config: QuantConfig, args: Optional[tuple],
                         kwargs: dict[str, Any], capture: str, dynamic_shapes: DynamicShapes,
                         instruments: Sequence[PassInstrument]) -> nn.Module:
    try:
        gm, report = capture_model(copied, args, kwargs, capture, dynamic_shapes)
    except CaptureError as error:
        if capture != "auto":
            raise
        # Neither method captures the whole model: quantize the parts that can be traced.
        partial, parts = prepare_partially(copied, args, kwargs, lambda gm, inputs: _prepare_graph(
            gm, PrepareContext(config, mode_inputs=inputs), instruments))
        if not parts.graph:
            raise CaptureError(f"{error} No submodule could be traced either:\n{parts}") from error
        partial.qzo_partial = parts  # type: ignore[assignment]  # an attribute, not a submodule
        return _state_keys_of(model, partial)
    gm.meta["qzo.capture"] = report
    ctx = PrepareContext(config, args, kwargs, user_modules=dict(model.named_modules()))
    return _state_keys_of(model, _prepare_graph(gm, ctx, instruments))


def _state_keys_of(model: nn.Module, prepared: nn.Module) -> nn.Module:
    """Keep ``prepared.state_dict()`` to the keys of ``model``'s plus the quantizers': capture
    turns non-persistent buffers (rotary ``inv_freq``), plain tensor attributes and lifted
    constants into buffers, and a user's own checkpoint would then not load with strict=True.
    They stay in the module (forward, ``to()``, pickling), outside the state_dict."""
    user = set(model.state_dict())
    for prefix, module in prepared.named_modules():
        if QUANT_CONTAINER in prefix.split("."):
            continue
        for name, _ in module.named_buffers(recurse=False):
            if (f"{prefix}.{name}" if prefix else name) not in user:
                module._non_persistent_buffers_set.add(name)
    return prepared


def _refuse_low_precision(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype in LOW_PRECISION:
            raise ConfigError("model dtype", tensor.dtype, "float32 or float64 parameters",
                              f"'{name}' is {tensor.dtype}: quantizer scales and the int32 bias grid are kept in "
                              "float32. Prepare the float32 model (model.float()) and train it under "
                              "torch.autocast(device_type, dtype=torch.bfloat16) for low-precision speed.")


def _prepare_graph(gm: GraphModule, ctx: PrepareContext, instruments) -> GraphModule:
    gm.meta.setdefault("qzo.capture", CaptureReport("symbolic"))
    prepared = PassManager(PREPARE_PIPELINE, instruments).run(gm, ctx).graph_module
    if ctx.config.weight is not None:
        _warn_float_weights(prepared)
    return prepared


def _warn_float_weights(gm: GraphModule) -> None:
    left = unquantized_weights(gm)
    if left:
        names = ", ".join(f"{w.name} ({w.op})" for w in left[:6]) + (" ..." if len(left) > 6 else "")
        warnings.warn(f"{len(left)} weight(s) stay in float: no quantization rule covers the op that reads them: "
                      f"{names}. qzo_fx.examine(model, example_inputs) lists them with their source.",
                      UserWarning, stacklevel=3)


def quantizer_containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(prefix, container)`` of every prepared part: the root, or submodules of a partial model."""
    return [(name.rpartition(".")[0] if "." in name else "", m) for name, m in model.named_modules()
            if name.rpartition(".")[2] == QUANT_CONTAINER]


def list_quantizers(model: nn.Module) -> list[QuantizerInfo]:
    """Every quantizer of a prepared model: parameter, bits, granularity, scale shape, STE.

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(8, 4), qzo_fx.QuantConfig(weight_bits=4))
        >>> qzo_fx.list_quantizers(qm)[0].scale_shape
        (4,)
    """
    rows = []
    for prefix, container in quantizer_containers(model):
        for name, q in container.named_children():
            if isinstance(q, Quantizer):
                info = q.info(name)
                if prefix:
                    info = dataclasses.replace(info, name=f"{prefix}.{info.name}", target=f"{prefix}.{info.target}")
                rows.append(info)
    return rows
