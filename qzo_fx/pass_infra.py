"""A small pass manager: named passes, lint + recompile after each, instruments.

A pass is a function ``(gm, *, ctx) -> PassResult``. It mutates ``gm`` in place and reports
``modified`` truthfully, so that running it twice reports ``modified=False`` the second time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from torch.fx import GraphModule

from qzo_fx.errors import PassError, QzoError

__all__ = ["PassResult", "Pass", "PassManager", "PassInstrument", "PrintAfterPass", "DumpPasses", "TimePasses"]


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool


@dataclass(frozen=True)
class Pass:
    """A named pass with the one-line reason it is in the pipeline."""

    name: str
    run: Callable[..., PassResult]
    why: str = ""


class PassInstrument(Protocol):
    def before(self, name: str, gm: GraphModule) -> None: ...

    def after(self, name: str, gm: GraphModule, result: PassResult) -> None: ...


class PrintAfterPass:
    """Print the generated code after each pass that changed the graph."""

    def before(self, name: str, gm: GraphModule) -> None:
        pass

    def after(self, name: str, gm: GraphModule, result: PassResult) -> None:
        if result.modified:
            print(f"# ---- after {name}\n{gm.code}")


class DumpPasses:
    """Write the code after every pass to ``directory/NNN_<pass>.py``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory, self.count = Path(directory), 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def before(self, name: str, gm: GraphModule) -> None:
        pass

    def after(self, name: str, gm: GraphModule, result: PassResult) -> None:
        self.count += 1
        (self.directory / f"{self.count:03d}_{name}.py").write_text(gm.code)


class TimePasses:
    """Collect wall time per pass in ``self.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def before(self, name: str, gm: GraphModule) -> None:
        self._start = time.perf_counter()

    def after(self, name: str, gm: GraphModule, result: PassResult) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._start


@dataclass
class PassManager:
    """Run passes in order; records ``gm.meta["qzo.passes"]`` as ``[(name, modified), ...]``."""

    passes: Sequence[Pass]
    instruments: Sequence[PassInstrument] = field(default_factory=tuple)

    def run(self, gm: GraphModule, ctx: Optional[Any] = None) -> PassResult:
        done: list[str] = []
        any_modified = False
        for p in self.passes:
            for instrument in self.instruments:
                instrument.before(p.name, gm)
            try:
                result = p.run(gm, ctx=ctx)
                gm = result.graph_module
                gm.graph.lint()
                gm.recompile()
            except QzoError:
                raise  # already names the place and the way out
            except Exception as error:
                raise PassError(f"pass {p.name!r} failed after {done}: {type(error).__name__}: {error}") from error
            for instrument in self.instruments:
                instrument.after(p.name, gm, result)
            gm.meta.setdefault("qzo.passes", []).append((p.name, result.modified))
            done.append(p.name)
            any_modified |= result.modified
        return PassResult(gm, any_modified)
