"""ONNX Runtime W8A8 and int4 weight-only vs PyTorch fp32 eager vs the fake-quant model.

    python benchmarks/onnx_inference.py [--quick]

Steady-state latency at batch 1 and 64 (median over interleaved blocks of back-to-back calls) on the MLP and the CNN, and file sizes
against an fp32 ONNX export of the same model. Targets (CPU): W8A8 >= 3x faster than fp32 eager
at batch 64; int4 file <= 0.16x the fp32 file.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

import qzo_fx
from qzo_fx.exporters.onnx_export import strip_debug_info
from qzo_fx.models import MLP, SmallCNN
from timing import interleaved

BLOCK = 10  # calls per turn; the first of each turn is dropped


def _median_ms(fns: dict, rounds: int) -> dict:
    # Steady-state latency: blocks of back-to-back calls, interleaved across the candidates.
    return {name: seconds * 1e3 for name, seconds in interleaved(fns, rounds, warmup=2, block=BLOCK).items()}


def _fp32_onnx(model, x, path: Path) -> int:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    model_proto = program.model_proto
    strip_debug_info(model_proto)  # the same treatment as the quantized files: a fair size ratio
    onnx.save(model_proto, str(path))
    return path.stat().st_size


def run(name: str, factory, rounds: int, out: Path) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    calib = torch.randn(64, 1, 28, 28)
    w8a8 = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(calib,)).eval()
    w4 = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4)).eval()
    # Common deployment practice: the first layer (1 input channel here) stays in float.
    w8a8_first_float = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8, skip_first=True),
                                      example_inputs=(calib,)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f8 = qzo_fx.export_onnx(w8a8, (calib[:2],), out / f"{name}_w8a8.onnx", target="cpu")
        f4 = qzo_fx.export_onnx(w4, (calib[:2],), out / f"{name}_w4.onnx", target="cpu")
        f8s = qzo_fx.export_onnx(w8a8_first_float, (calib[:2],), out / f"{name}_w8a8_skip.onnx", target="cpu")
    fp32_bytes = _fp32_onnx(model, calib[:2], out / f"{name}_fp32.onnx")
    # ORT on one thread, torch on all: an ORT thread pool keeps spinning after a call and takes
    # the cores from the torch call timed next (seen: torch's MLP 27x slower). A lower bound for ORT.
    s8, s4, s8s = (qzo_fx.onnx_session(f.path, "cpu", threads=1) for f in (f8, f4, f8s))
    s32 = qzo_fx.onnx_session(out / f"{name}_fp32.onnx", "cpu", threads=1)
    print(f"\n== {name}: files fp32 {fp32_bytes / 1024:.1f} KiB | W8A8 {f8.size_bytes / 1024:.1f} KiB "
          f"({f8.size_bytes / fp32_bytes:.3f}x) | int4 weight-only {f4.size_bytes / 1024:.1f} KiB "
          f"({f4.size_bytes / fp32_bytes:.3f}x)")
    for batch in (1, 64):
        x = calib[:batch]
        feed = lambda s: (lambda: s.run(None, {s.get_inputs()[0].name: x.numpy()}))
        with torch.no_grad():
            t = _median_ms({"torch fp32 eager": lambda: model(x), "torch fake-quant W8A8": lambda: w8a8(x),
                            "ORT fp32": feed(s32), "ORT W8A8": feed(s8), "ORT W8A8, 1st layer float": feed(s8s),
                            "ORT int4 weight-only": feed(s4)}, rounds)
        base = t["torch fp32 eager"]
        print(f"   batch {batch}:")
        for key, ms in t.items():
            print(f"     {key:26s} {ms:8.3f} ms   {base / ms:5.2f}x vs fp32 eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 5 if args.quick else 40
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {rounds} interleaved rounds "
          f"of {BLOCK} calls (first dropped); ONNX Runtime on 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory in (("mlp", MLP), ("cnn", SmallCNN)):
            run(name, factory, rounds, Path(tmp))


if __name__ == "__main__":
    main()
