"""The ``qzo-fx`` command line: ``inspect``, ``export`` and ``bench``."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.nn as nn
from tabulate import tabulate
from torch.fx import GraphModule

from qzo_fx.capture.pipeline import list_quantizers, prepare
from qzo_fx.config import QuantConfig, QuantSpec
from qzo_fx.errors import QzoError
from qzo_fx.inspect.graphs import draw_svg, graph_diff, tabular, to_dot

__all__ = ["main", "load_factory"]


def load_factory(spec: str) -> tuple[nn.Module, Optional[tuple[Any, ...]]]:
    """``"package.module:factory"`` -> (model, example_inputs or None).

    The factory returns a model, or a ``(model, example_inputs)`` pair.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise QzoError(f"{spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:make_model")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise QzoError(f"{spec!r}: cannot load the factory ({error}).") from error
    made = factory()
    model, inputs = (made if isinstance(made, tuple) else (made, None))
    if not isinstance(model, nn.Module):
        raise QzoError(f"{spec!r} returned {type(model).__name__}, not an nn.Module.")
    return model, (tuple(inputs) if inputs is not None else None)


def _config(args: argparse.Namespace) -> QuantConfig:
    target = getattr(args, "target", "auto")
    if target == "auto":
        return QuantConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits)
    # Train with the numerics the target runs: its weight range, and symmetric activations for
    # TensorRT (which refuses zero points).
    activation = None if args.activation_bits is None else QuantSpec(
        bits=args.activation_bits, granularity="per_tensor", symmetric=target == "tensorrt")
    return QuantConfig(weight_bits=args.weight_bits, activation=activation, target=target)


def _inspect(args: argparse.Namespace) -> int:
    model, inputs = load_factory(args.factory)
    qm = prepare(model, _config(args), example_inputs=inputs)
    rows = [(q.name, q.role, q.target, q.bits, q.granularity, q.scale_shape, q.ste) for q in list_quantizers(qm)]
    method = qm.meta["qzo.capture"].method if isinstance(qm, GraphModule) else "partial"
    print(f"captured with: {method}; {len(rows)} quantizers")
    print(tabulate(rows, headers=["quantizer", "role", "target", "bits", "granularity", "scale", "ste"]))
    if args.table:
        print(tabular(qm))
    if not isinstance(qm, GraphModule):
        print(qm.qzo_partial)
    else:
        print(graph_diff(model, qm) if inputs is None or method == "symbolic" else qm.code)
    if args.svg:
        try:
            print(f"wrote {draw_svg(qm, args.svg)}")
        except QzoError as error:
            dot = Path(args.svg).with_suffix(".dot")
            dot.write_text(to_dot(qm))
            print(f"{error}\nwrote {dot} instead", file=sys.stderr)
    return 0


def _load_model(args: argparse.Namespace):
    """(prepared model, example inputs): from a factory, or a saved prepared model + shape."""
    if args.model.endswith((".pt", ".pth")):
        import torch

        qm = torch.load(args.model, weights_only=False)
        if not args.input_shape:
            raise QzoError(f"{args.model}: a saved model needs --input-shape, e.g. --input-shape 2,1,28,28")
        return qm, (torch.randn(*[int(d) for d in args.input_shape.split(",")]),)
    model, inputs = load_factory(args.model)
    if inputs is None:
        raise QzoError(f"{args.model}: export needs example inputs; return (model, (x,)) from the factory.")
    return prepare(model, _config(args), example_inputs=inputs), inputs


def _export(args: argparse.Namespace) -> int:
    from qzo_fx.exporters.onnx_export import export_onnx
    from qzo_fx.exporters.verify import verify_onnx

    qm, inputs = _load_model(args)
    result = export_onnx(qm, inputs, args.out, target=args.target)
    print(f"wrote {result.path}: {result.size_bytes / 1024:.1f} KiB, opset {result.opset}, "
          f"dynamic batch {result.dynamic_batch}")
    print(tabulate(sorted(result.op_types.items()), headers=["ONNX op", "count"]))
    report = verify_onnx(qm, result.path, inputs, target="cpu" if args.target in ("auto", "portable") else args.target)
    print(report)
    return 0 if report.ok else 1


BENCHMARKS = ("step_overhead", "onnx_inference", "memory", "zoqo", "fogzo_vs_ste", "mnist_compute")


def _bench(args: argparse.Namespace) -> int:
    import runpy

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / f"{args.name}.py"
    if not script.exists():
        raise QzoError(f"benchmark {args.name!r} not found in {folder}: benchmarks ship with the source checkout "
                       "(git clone ... && pip install -e .).")
    argv = [str(script)] + (["--quick"] if args.quick else []) + list(args.rest)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = argv, [str(folder)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qzo-fx", description="Low-bit QAT on torch.fx with STE and zeroth-order estimators.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="prepare a model and show its quantizers, graph diff and picture")
    inspect.add_argument("factory", help="MODULE:FACTORY returning a model or (model, example_inputs)")
    inspect.add_argument("--weight-bits", type=int, default=8)
    inspect.add_argument("--activation-bits", type=int, default=None)
    inspect.add_argument("--svg", default=None, help="write a drawing of the prepared graph")
    inspect.add_argument("--table", action="store_true", help="also print the node table")
    inspect.set_defaults(run=_inspect)
    export = sub.add_parser("export", help="prepare (or load) a model, write ONNX, print size, ops and parity")
    export.add_argument("model",
                        help="MODULE:FACTORY returning (model, example_inputs), or a saved prepared model (.pt)")
    export.add_argument("--out", default="model.onnx")
    export.add_argument("--target", default="auto", choices=("auto", "cpu", "cuda", "tensorrt", "portable"))
    export.add_argument("--weight-bits", type=int, default=8)
    export.add_argument("--activation-bits", type=int, default=None)
    export.add_argument("--input-shape", default=None, help="for a saved model: e.g. 2,1,28,28")
    export.set_defaults(run=_export)
    bench = sub.add_parser("bench", help="run a benchmark script (figures are printed; see docs/)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--quick", action="store_true", help="a reduced run (under 2 minutes)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="further options for the script")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QzoError as error:
        print(f"qzo-fx: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
