"""What computing BatchNorm folded costs the eval-mode model in torch: the same model prepared with
and without the prepare pass ``fold_eval_batchnorm``, eval forwards interleaved in one process.

    python benchmarks/eval_batchnorm_fold.py [--rounds 10]

torchvision ResNet-18 and timm EfficientNet-B0 at random init, W8A8 defaults, 8 x 3 x 128 x 128,
one thread, CPU time per forward (median). The fold adds weight-sized work per call (the codes
recovered and rescaled) and removes the BatchNorm on the activations; the training step is not
affected (the train-mode graph has no fold).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo's torchvision shim

from batchnorm_folding import prepared_w8a8  # noqa: E402


def _models() -> dict:
    from tests.zoo.models import torchvision_shim

    torchvision_shim()
    import timm
    import torchvision

    return {"tv/resnet18": lambda: torchvision.models.resnet18(num_classes=10),
            "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for name, build in _models().items():
        torch.manual_seed(0)
        model, x = build(), torch.randn(8, 3, 128, 128)
        models = {"folded": prepared_w8a8(model, x, True), "unfolded": prepared_w8a8(model, x, False)}
        times: dict[str, list[float]] = {k: [] for k in models}
        with torch.no_grad():
            for qm in models.values():
                qm(x)
            for _ in range(args.rounds):
                for label, qm in models.items():
                    start = time.process_time()
                    qm(x)
                    times[label].append(time.process_time() - start)
        folded, unfolded = (statistics.median(times[k]) for k in ("folded", "unfolded"))
        print(f"{name}: eval forward folded {folded * 1e3:.1f} ms, unfolded {unfolded * 1e3:.1f} ms CPU, "
              f"ratio {folded / unfolded:.3f}", flush=True)


if __name__ == "__main__":
    main()
