"""A GraphModule with one graph per mode, so ``train()`` / ``eval()`` mean what they mean in torch.

Capture evaluates ``if self.training:`` once: symbolic tracing bakes the branch it took (timm's
BatchNormAct2d, DropPath), and torch.export also fixes dropout and batch-norm behaviour. Capture
therefore records the model once in each mode, and :class:`PreparedModel` holds both graphs over
one set of submodules, parameters, buffers and quantizers: switching the mode switches which graph
runs. When the two captures are the same program, one graph serves both modes.

Passes see one graph at a time: :func:`each_mode` runs a pass on every distinct graph, with the
module's ``training`` flags left as they are.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping, Optional

import torch.nn as nn
from torch.fx import Graph, GraphModule
from torch.fx.graph_module import _CodeOnlyModule, _copy_attr, _format_import_block, reduce_graph_module
from torch.package import sys_importer

from qzo_fx.capture.call_errors import (
    FOLDED_IN_EVAL,
    FOLDED_KEY,
    check_fixed_dims,
    integer_inputs_widened,
    take_constant_keywords,
    uncalled_modules,
    warn_hooks_that_cannot_run,
    why_call_failed,
)
from qzo_fx.capture.loading import initialize_unloaded, quantizers_left_unloaded
from qzo_fx.errors import InputError, MethodNotKeptError
from qzo_fx.pass_infra import PassResult

__all__ = ["PreparedModel", "each_mode", "graph_of_mode", "distinct_modes"]


def _has_target(module: nn.Module, target: str) -> bool:
    for item in target.split("."):
        if not hasattr(module, item):
            return False
        module = getattr(module, item)
    return True


class PreparedModel(GraphModule):
    """A prepared model: a GraphModule whose graph follows ``self.training``.

    ``qzo_mode_graphs[True]`` runs in train mode and ``qzo_mode_graphs[False]`` in eval mode;
    ``graph`` and ``code`` are those of the current mode. Both graphs read the same state, so
    ``state_dict``, ``parameters()``, ``to()`` and optimizers see one model.
    """

    def __init__(self, root: nn.Module, graphs: Mapping[bool, Graph], class_name: str = "PreparedModel") -> None:
        train_graph, eval_graph = graphs[True], graphs[False]
        super().__init__(root, train_graph, class_name)
        if not isinstance(root, _CodeOnlyModule):
            # GraphModule keeps only what its graph reads; a prepared model keeps the whole
            # module tree, so its state_dict holds every key of the model's (and what only the
            # eval graph reads).
            direct = [*root.named_children(), *root.named_parameters(recurse=False), *root.named_buffers(recurse=False)]
            for name, value in direct:
                # GraphModule rebuilds the path to each module its graph reads out of bare
                # nn.Modules; the model's own container (a Sequential: indexing, len, iteration)
                # holds the same leaves.
                rebuilt = type(self._modules.get(name)) is nn.Module and type(value) is not nn.Module
                if not hasattr(self, name) or rebuilt:
                    _copy_attr(root, self, name)
            for node in eval_graph.nodes:
                if node.op in ("get_attr", "call_module") and not _has_target(self, str(node.target)):
                    _copy_attr(root, self, str(node.target))
        _keep_non_persistent(root, self)
        self._qzo_unloaded: list[str] = []
        self.register_load_state_dict_post_hook(_initialize_unloaded)
        self.qzo_mode_graphs = {True: train_graph, False: eval_graph}
        self.training = root.training
        self._show(self.training)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_qzo_uncalled") is None:  # once: the graphs call the same modules after
            self._qzo_uncalled = uncalled_modules(self, list(self.qzo_mode_graphs.values()))
            self._qzo_folded = [(name, self.get_submodule(name)) for name in self.meta.get(FOLDED_KEY, ())]
            self._qzo_hooks_warned: set[str] = set()
            self._qzo_input_names = tuple(inspect.signature(self.forward).parameters)
        warn_hooks_that_cannot_run(self._qzo_uncalled, self._qzo_hooks_warned)
        if not self.training:
            warn_hooks_that_cannot_run(self._qzo_folded, self._qzo_hooks_warned, FOLDED_IN_EVAL)
        report = self.meta.get("qzo.capture")
        if kwargs and getattr(report, "constant_keywords", None):
            kwargs = take_constant_keywords(type(self).__name__, kwargs, report.constant_keywords)
        if getattr(report, "input_dtypes", None):
            # An exported graph asserts its inputs' dtypes; the float model takes integer inputs of
            # another width (int32 token ids or masks), so this converts them to the example's.
            args, kwargs = integer_inputs_widened(self._qzo_input_names, report.input_dtypes, args, kwargs)
        check_fixed_dims(self, report, args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except Exception as error:
            why = why_call_failed(self, report, args, kwargs, error)
            if why is None:
                raise  # the call fits the graph: the error is the model's own
            raise InputError(f"{type(self).__name__} (prepared) {why}") from error

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError as error:
            model_class = getattr(self.__dict__.get("meta", {}).get("qzo.capture"), "model_class", None)
            if model_class is None or not hasattr(model_class, name):
                raise
            raise MethodNotKeptError(
                f"{type(self).__name__} (prepared) has no '{name}': a prepared model is a torch.fx GraphModule "
                f"that keeps {model_class.__name__}'s forward, modules, parameters and buffers, not its other "
                "methods. Generation: qzo_fx.export_causal_lm(...) then qzo_fx.generate(...). Anything else: load "
                "the trained weights into the model's own class (model.load_state_dict(qm.state_dict(), "
                "strict=False); the qzo_quant.* keys are the quantizers').") from error

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Runs before the weights load; _initialize_unloaded runs after.
        self._qzo_unloaded = quantizers_left_unloaded(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ mode switching
    def train(self, mode: bool = True) -> "PreparedModel":
        super().train(mode)
        self._show(mode)
        return self

    def _show(self, training: bool) -> None:
        """Make the graph of ``training`` the one that runs (recompiled only when it changes)."""
        graph = self.qzo_mode_graphs[training]
        if self._graph is not graph:
            GraphModule.graph.fset(self, graph)

    @property
    def graph(self) -> Graph:
        return self._graph

    @graph.setter
    def graph(self, g: Graph) -> None:
        # Replacing the graph replaces it for the current mode (for both if they shared one).
        graphs = getattr(self, "qzo_mode_graphs", None)
        if graphs is not None:
            shared = graphs[True] is graphs[False]
            for training in ((True, False) if shared else (self.training,)):
                graphs[training] = g
        GraphModule.graph.fset(self, g)

    # ------------------------------------------------------------------ copies and pickling
    def _deepcopy_init(self) -> Callable[..., None]:
        def init(res: "PreparedModel", fake_mod: nn.Module, graph: Graph) -> None:
            PreparedModel.__init__(res, fake_mod, fake_mod.__dict__["qzo_mode_graphs"], type(self).__name__)
        return init

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles its code and traces it again on load; do that for each mode.
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "qzo_mode_graphs")}
        body["_tracer_cls"] = _retracer(self._tracer_cls)
        codes = {}
        for training, graph in self.qzo_mode_graphs.items():
            python_code = graph.python_code(root_module="self")
            codes[training] = (python_code.src, _format_import_block(python_code.globals, sys_importer))
        return (_rebuild, (body, codes, self.training, type(self).__name__))


def _retracer(tracer_cls: Optional[type]) -> type:
    """The tracer that unpickling re-traces the graphs' code with. It must build without arguments
    and must proxy buffer reads: torch.fx's default tracer would run ``scale_x * scale_w`` on the
    real buffers and bake the product in as a constant. A torch.export graph names make_fx's
    module-stack tracer, which needs its root; symbolic captures name StateTracer already."""
    from qzo_fx.capture.tracing import StateTracer  # tracing builds PreparedModels: imported late

    if tracer_cls is not None and issubclass(tracer_cls, StateTracer):
        return tracer_cls
    return StateTracer


def _rebuild(body: dict[str, Any], codes: dict[bool, tuple[str, str]], training: bool,
             class_name: str) -> PreparedModel:
    graphs = {}
    for mode, (src, imports) in codes.items():
        # A fused op's dropout reads its module's ``training`` flag, a plain attribute that the
        # trace reads as a constant: trace each mode's graph with the modules in that mode.
        with _submodules_in_mode(body, mode):
            graphs[mode] = reduce_graph_module({**body, "_code": src}, imports).graph
    if graphs[True].python_code("self").src == graphs[False].python_code("self").src:
        graphs[False] = graphs[True]
    # A code-only root: every submodule, parameter and buffer is kept, not only what a graph reads.
    model = PreparedModel(_CodeOnlyModule(dict(body, training=training)), graphs, class_name)
    for key, value in body.items():
        if not hasattr(model, key):
            setattr(model, key, value)
    model.meta.update(body.get("meta", {}))  # the capture report: how calls are checked
    return model


@contextlib.contextmanager
def _submodules_in_mode(body: dict[str, Any], training: bool) -> Iterator[None]:
    modules = [m for child in body.get("_modules", {}).values() if child is not None for m in child.modules()]
    saved = [m.training for m in modules]
    try:
        for m in modules:
            m.training = training
        yield
    finally:
        for m, flag in zip(modules, saved):
            m.training = flag


# ---------------------------------------------------------------------- passes over both modes
def distinct_modes(gm: nn.Module) -> tuple[bool, ...]:
    """The modes whose graphs differ: ``(True,)`` when one graph serves both (or ``gm`` is a plain
    GraphModule), else ``(True, False)``."""
    graphs = getattr(gm, "qzo_mode_graphs", None)
    return (True,) if graphs is None or graphs[True] is graphs[False] else (True, False)


@contextlib.contextmanager
def graph_of_mode(gm: GraphModule, training: bool) -> Iterator[GraphModule]:
    """Show the graph of ``training`` on ``gm`` for a while, without changing any module's
    ``training`` flag (passes edit graphs; the flags are the user's)."""
    if not isinstance(gm, PreparedModel):
        yield gm
        return
    before = gm.training
    gm._show(training)
    try:
        yield gm
    finally:
        gm._show(before)


def each_mode(pass_fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
    """A pass that runs ``pass_fn`` on the graph of every distinct mode."""
    def run(gm: GraphModule, *, ctx: Any = None) -> PassResult:
        modified = False
        for training in distinct_modes(gm):
            with graph_of_mode(gm, training):
                result = pass_fn(gm, ctx=ctx)
                result.graph_module.graph.lint()
                result.graph_module.recompile()
                modified |= result.modified
        return PassResult(gm, modified)

    run.__name__ = run.__qualname__ = getattr(pass_fn, "__name__", "pass")
    run.__doc__ = pass_fn.__doc__
    return run


def _initialize_unloaded(module: nn.Module, incompatible_keys: Any) -> None:
    if getattr(module, "_qzo_unloaded", None):
        initialize_unloaded(module, module._qzo_unloaded)
        module._qzo_unloaded = []


def _keep_non_persistent(root: nn.Module, module: nn.Module) -> None:
    """GraphModule registers every tensor it copies as a persistent buffer: mark again the ones
    ``root`` keeps out of its state_dict (so copies and unpickled models keep the same keys)."""
    for name, source in root.named_modules():
        try:
            target = module.get_submodule(name)
        except AttributeError:
            continue
        target._non_persistent_buffers_set |= source._non_persistent_buffers_set & set(target._buffers)
