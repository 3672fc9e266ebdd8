"""Capture: turn an ``nn.Module`` into a :class:`~qzo_fx.capture.modal.PreparedModel` holding one
graph per mode.

Order: ``torch.fx.symbolic_trace`` (keeps modules and readable code; every shape stays dynamic),
then, when that fails or would return another output type (a Hugging Face ``ModelOutput`` as a
plain dict) and example inputs are given, ``torch.export`` (ATen graph, handles data-dependent
Python; batch and sequence dimensions exported dynamic). Each method records the
model in train mode and in eval mode, because both bake ``if self.training:`` at capture.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule
from torch.fx.graph_module import _assign_attr
from torch.nn.utils import parametrize

from qzo_fx.capture.export_inputs import (
    DynamicShapes,
    call_checked_dims,
    constant_keywords,
    distinct_tensors,
    export_spec,
    fixed_token_dims,
    input_dims,
    input_dtypes,
    keywords_bound,
)
from qzo_fx.capture.hf import export_helpers, is_hf_model
from qzo_fx.capture.modal import PreparedModel
from qzo_fx.capture.none_arguments import check_none_arguments, expect_none, none_arguments
from qzo_fx.errors import CaptureError
from qzo_fx.quant.op_table import multi_head_attention, recurrent

__all__ = ["capture", "CaptureReport", "CAPTURE_METHODS", "GRAPH_MODULE_NAMES", "StateTracer", "graph_module_names",
           "modes_kept", "none_arguments", "trace_modes"]

CAPTURE_METHODS = ("auto", "symbolic", "export")
# ``dynamic_shapes``: "auto" (batch and sequence dynamic), False (the example's shapes), or a
# torch.export dynamic_shapes spec of the user's.


@dataclass
class CaptureReport:
    method: str
    failures: dict[str, str] = field(default_factory=dict)
    shapes: str = ""                       # which input dimensions are dynamic, in words
    specialized: dict[str, None] = field(default_factory=dict)  # forward arguments fixed to None
    dropped_types: list[type] = field(default_factory=list)  # dict subclasses a symbolic trace made dicts
    model_inputs: tuple[str, ...] = ()     # the user's forward's parameters, captured or not
    model_class: Optional[type] = None     # the user's model's class (its methods are not kept)
    constant_keywords: dict[str, Any] = field(default_factory=dict)  # **kwargs flags bound at capture
    input_dims: dict[str, tuple[Optional[int], ...]] = field(default_factory=dict)  # None: dynamic
    checked_dims: dict[str, dict[int, int]] = field(default_factory=dict)  # axis -> size each call must have
    input_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # what the exported graph's guards take


@contextlib.contextmanager
def modes_kept(model: nn.Module, training: Optional[bool] = None) -> Iterator[None]:
    """Set every submodule to ``training`` (if given) for a while, then restore each module's own
    flag: a user's model may hold submodules in another mode than its root."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class StateTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that records buffer reads as graph values: an in-place update of a
    buffer (BatchNorm's ``num_batches_tracked.add_(1)`` in a module's own forward) then becomes
    part of the graph instead of running once, at trace time.

    torch.fx rebuilds tuples, lists and named tuples as they were but writes every dict as a
    ``{...}`` literal. An ``OrderedDict`` (torchvision's segmentation models return one) is
    rebuilt by a call of its class on that literal; any other dict subclass is noted in
    ``dropped_types``, since it comes back a plain dict (a Hugging Face ``ModelOutput``:
    ``out.logits`` would become ``out["logits"]``)."""

    proxy_buffer_attributes = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The functions prepare and capture put into graphs stay single calls when a graph's code
        # is traced again (unpickling): their Python bodies branch on values a trace does not have.
        kwargs.setdefault("autowrap_functions", (recurrent, multi_head_attention, expect_none))
        super().__init__(*args, **kwargs)
        self.dropped_types: list[type] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # torch.fx keeps every torch.nn module as one call. A composite one (TransformerEncoder,
        # TransformerEncoderLayer) holds Linear layers that would then stay in float: trace into
        # it. Attention and recurrent modules stay calls (prepare rewrites them as fused ops),
        # and so do parametrized modules (their weight is computed, not a parameter).
        leaf = super().is_leaf_module(m, module_qualified_name)
        if leaf and next(m.children(), None) is not None:
            return isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) or parametrize.is_parametrized(m)
        return leaf

    def create_arg(self, a: Any) -> Any:
        if type(a) is collections.OrderedDict:
            # Its constructor takes the plain dict, in the same order: the graph returns the type.
            return self.create_node("call_function", collections.OrderedDict, (super().create_arg(dict(a)),), {})
        if isinstance(a, dict) and type(a) is not dict:
            self.dropped_types.append(type(a))
        return super().create_arg(a)


ModeInputs = Mapping[bool, tuple[Any, Any]]  # mode -> (args, kwargs) the module is called with


def trace_modes(model: nn.Module, inputs: ModeInputs, report: CaptureReport,
                tracer: Callable[[], StateTracer] = StateTracer) -> PreparedModel:
    """Symbolic trace of ``model`` in each mode, with the forward arguments that are None in
    that mode's inputs traced as the constant None (:func:`none_arguments`).

    Args:
        model: the module to trace (a whole model, or a part of one under partial capture).
        inputs: the ``(args, kwargs)`` it is called with in train (True) and eval (False) mode.
        report: gets ``specialized`` (the arguments None in both modes) and ``dropped_types``.
        tracer: builds the tracer of each mode.

    Returns:
        The prepared model holding both graphs.
    """
    graphs: dict[bool, Graph] = {}
    fixed: dict[bool, dict[str, None]] = {}
    for training in (True, False):
        fixed[training] = none_arguments(model, *inputs[training])
        with modes_kept(model, training):
            mode_tracer = tracer()
            graphs[training] = mode_tracer.trace(model, concrete_args=fixed[training] or None)
        check_none_arguments(graphs[training], model, fixed[training])
        report.dropped_types.extend(t for t in mode_tracer.dropped_types if t not in report.dropped_types)
    # Each graph refuses a value for its own None arguments; the report names those of both modes.
    report.specialized = {name: None for name in fixed[True] if name in fixed[False]}
    return PreparedModel(model, _shared_if_same(graphs), type(model).__name__)


def _symbolic(model: nn.Module, args, kwargs, dynamic: DynamicShapes, report: CaptureReport) -> PreparedModel:
    gm = trace_modes(model, {True: (args, kwargs), False: (args, kwargs)}, report)
    report.shapes = "all dimensions (symbolic trace)"
    return gm


def _shared_if_same(graphs: dict[bool, Graph]) -> dict[bool, Graph]:
    """One graph for both modes when the two captures are the same program."""
    same = graphs[True].python_code("self").src == graphs[False].python_code("self").src
    return {True: graphs[True], False: graphs[True] if same else graphs[False]}










@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # A failed export logs and prints the partial graph; the reason goes into the report instead.
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._dynamo")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)




def _export_once(model: nn.Module, args, kwargs, spec, patched: bool = False) -> GraphModule:
    args, kwargs = distinct_tensors((tuple(args), dict(kwargs or {})))
    with _quiet(), export_helpers(model, patched):
        program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=spec, strict=False)
    # check_guards=False: no guard submodule; the mode methods torch replaces are restored below.
    module = program.module(check_guards=False)
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


def _export_modes(model: nn.Module, args, kwargs, spec, patched: bool = False) -> dict[bool, GraphModule]:
    modules = {}
    for training in (True, False):
        with modes_kept(model, training):
            modules[training] = _export_once(model, args, kwargs, spec, patched)
    return modules








def _export(model: nn.Module, args, kwargs, dynamic: DynamicShapes, report: CaptureReport) -> PreparedModel:
    if args is None:
        raise CaptureError("torch.export needs example_inputs; pass example_inputs=(x,) to prepare().")
    report.specialized = {}  # torch.export takes None arguments as constants itself
    report.constant_keywords = constant_keywords(model, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in report.constant_keywords}
    spec = export_spec(model, args, kwargs, dynamic)
    with keywords_bound(model, report.constant_keywords):
        try:
            modules = _export_modes(model, args, kwargs, spec)
        except Exception as error:
            modules, spec = _export_fallback(model, args, kwargs, dynamic, spec, error, report)
    report.shapes = "static (the example's shapes)" if spec is None else (
        "batch and sequence dimensions" if dynamic == "auto" else "as given by dynamic_shapes")
    if spec is None and dynamic == "auto":
        warnings.warn(f"{type(model).__name__} was captured with the example's shapes only: torch.export could not "
                      f"make its batch and sequence dimensions dynamic ({report.failures.get('dynamic shapes', '')}). "
                      "Calls with other shapes raise InputError; pass dynamic_shapes=... to prepare() to say which "
                      "dimensions vary.", UserWarning, stacklevel=4)
    root = modules[True]
    report.input_dims = input_dims(root)  # calls with another size of a fixed one get an InputError
    report.checked_dims = call_checked_dims(root, tuple(inspect.signature(root.forward).parameters))
    report.input_dtypes = input_dtypes(root)
    if spec is not None:
        _warn_fixed_token_dims(model, fixed_token_dims(root, spec, report.input_dims), report)
    _adopt_eval_state(root, modules[False])
    root.training = model.training
    return PreparedModel(root, _shared_if_same({True: root.graph, False: modules[False].graph}), type(model).__name__)


def _warn_fixed_token_dims(model: nn.Module, fixed: dict[str, str], report: CaptureReport) -> None:
    if not fixed or report.shapes != "batch and sequence dimensions":
        return
    report.shapes = f"batch; fixed at capture: {fixed}"
    ones = any(v.endswith("= 1") for text in fixed.values() for v in text.split(", "))
    why = ("torch.export fixes a dimension of size 1 in the example: give examples of size 2 or more"
           if ones else "torch.export found that the model branches on or reshapes by them")
    warnings.warn(f"{type(model).__name__} was captured with these input dimensions fixed ({why}): {fixed}. "
                  "Calls with other sizes raise InputError.", UserWarning, stacklevel=5)


def _export_fallback(model: nn.Module, args, kwargs, dynamic: DynamicShapes, spec, error: Exception,
                     report: CaptureReport) -> tuple[dict[bool, GraphModule], Any]:
    """What to give up when the model as given does not export, in order: transformers' export
    patches applied (Hugging Face models), then the KV cache it returns by default (training
    never reads it), then the dynamic shapes. Each step gives up what the one before did too."""
    is_hf, config = is_hf_model(model), getattr(model, "config", None)
    steps = [("exact model", lambda: _export_modes(model, args, kwargs, spec, patched=True), is_hf),
             ("cache output", lambda: _without_cache(model, args, kwargs, spec, is_hf),
              bool(getattr(config, "use_cache", None))),
             ("dynamic shapes", lambda: _export_modes(model, args, kwargs, None, patched=is_hf),
              dynamic == "auto" and spec is not None)]
    with _cache_flag_restored_on_failure(config):
        for what, attempt, applies in steps:
            if not applies:
                continue
            report.failures[what] = _reason(error)
            try:
                return attempt(), None if what == "dynamic shapes" else spec
            except Exception as retry:
                error = retry
        raise error


@contextlib.contextmanager
def _cache_flag_restored_on_failure(config: Any) -> Iterator[None]:
    """Set ``config.use_cache`` back when no retry exports the model: the cache retry turns it
    off on prepare's copy, and the partial capture that follows prepares that same copy, which
    must still return its cache as the user's model does."""
    kept = hasattr(config, "use_cache")
    saved = getattr(config, "use_cache", None)
    try:
        yield
    except BaseException:
        if kept:
            config.use_cache = saved
        raise


def _without_cache(model: nn.Module, args, kwargs, spec, patched: bool) -> dict[bool, GraphModule]:
    model.config.use_cache = False  # prepare's own copy: the user's config is untouched
    return _export_modes(model, args, kwargs, spec, patched)


def _adopt_eval_state(root: GraphModule, other: GraphModule) -> None:
    """Make the eval-mode graph read the train-mode module's state. Parameters and buffers are
    the model's own tensors in both exports (same names, same objects); a constant that only the
    eval export lifted, or lifted under a name the train export used for another tensor, is
    registered under a name of its own."""
    for node in other.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        value = other.get_submodule(target) if node.op == "call_module" else _lookup(other, target)
        if _lookup(root, target) is value:
            continue
        fresh = "qzo_eval_" + target.replace(".", "_")
        _assign_attr(value, root, fresh)
        node.target = fresh


def _lookup(module: nn.Module, target: str) -> Any:
    for item in target.split("."):
        module = getattr(module, item, None)
        if module is None:
            return None
    return module


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


_CAPTURERS = {"symbolic": _symbolic, "export": _export}


def _refuse_dropped_types(model: nn.Module, report: CaptureReport) -> None:
    """Under ``capture="auto"``, pass over a symbolic capture that changed a container's type:
    torch.export then captures the model, and its pytree output spec keeps registered classes
    such as ``ModelOutput``. ``capture="symbolic"`` keeps such a trace, as asked."""
    if report.dropped_types:
        names = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in report.dropped_types)
        raise CaptureError(f"{type(model).__name__} returns a {names}, which a symbolic trace returns as a plain dict.")


# What a torch.fx GraphModule uses for itself: a module with a direct submodule, parameter or
# buffer of one of these names (research code's ``self.meta``, ``self.graph``, ``self.code``)
# cannot become one (partial capture runs it as it is, with its parts prepared).
GRAPH_MODULE_NAMES = ("meta", "graph", "code")


def graph_module_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s own attributes that a GraphModule uses itself."""
    return [n for n in (*module._modules, *module._parameters, *module._buffers) if n in GRAPH_MODULE_NAMES]


def _refuse_graph_module_names(model: nn.Module) -> None:
    clash = graph_module_names(model)
    if clash:
        kind = type(getattr(model, clash[0])).__name__
        raise CaptureError(
            f"{type(model).__name__} has a top-level attribute {clash[0]!r} ({kind}); a whole-graph capture is a "
            f"torch.fx GraphModule, which uses {', '.join(GRAPH_MODULE_NAMES)} itself. Use capture='auto' (partial "
            "capture keeps the model's own root), or prepare a module that holds this model (self.model = model; "
            "its state_dict keys then start with 'model.').")


def capture(model: nn.Module, example_inputs: Optional[tuple[Any, ...]] = None,
            example_kwargs: Optional[dict[str, Any]] = None, method: str = "auto",
            dynamic_shapes: DynamicShapes = "auto") -> tuple[PreparedModel, CaptureReport]:
    """Capture ``model`` (already a copy: capture shares its submodules) in both modes."""
    if method not in CAPTURE_METHODS:
        raise CaptureError(f"capture={method!r} is invalid: allowed {CAPTURE_METHODS}.")
    _refuse_graph_module_names(model)
    order = ["symbolic", "export"] if method == "auto" else [method]
    report = CaptureReport(method="", model_inputs=tuple(inspect.signature(model.forward).parameters),
                           model_class=type(model))
    for name in order:
        try:
            with modes_kept(model):
                gm = _CAPTURERS[name](model, example_inputs, example_kwargs, dynamic_shapes, report)
                if method == "auto" and name == "symbolic" and example_inputs is not None:
                    _refuse_dropped_types(model, report)
        except CaptureError as error:
            report.failures[name] = str(error)
        except Exception as error:  # torch raises many types here; keep the reason, try the next
            report.failures[name] = _reason(error)
        else:
            report.method = name
            return gm, report
    reasons = "; ".join(f"{k}: {v}" for k, v in report.failures.items())
    hint = " Pass example_inputs=(...) so torch.export can be tried." if example_inputs is None else ""
    raise CaptureError(f"Could not capture {type(model).__name__} ({reasons}).{hint}")
