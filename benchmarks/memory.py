"""Peak extra memory of a training step per estimator and branch strategy.

    python benchmarks/memory.py [--width 2048]

Each configuration runs in its own process on an MLP width-width-width-10 (2-bit weights,
batch 64): the figure is the process's peak RSS during 5 steps minus its RSS after one plain
STE step (model, gradients and optimizer state already allocated) and one step of the same kind
on a tiny model (the code it runs loaded: numba's compiled kernels alone take ~100 MiB). ``lean`` streams the
perturbation tensor by tensor and should stay near the largest tensor; the others hold a few
model-sized buffers (noise, deltas, branch values, a snapshot for inplace).

The processes run with ``MALLOC_MMAP_THRESHOLD_=65536`` (each allocation from 64 KiB up its own
mapping, returned to the system when freed), so that RSS follows the live tensors: with glibc's
default, freed large blocks raise the threshold and later ones are served from a heap that RSS
keeps, which moved a step's peak by tens of MiB depending on allocation order.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from tabulate import tabulate

import qzo_fx
from qzo_fx.models import MLP
from qzo_fx.models import classification_loss as ce

CONFIGS = [("STE", None), ("FOGZO", "inplace"), ("FOGZO", "sequential"), ("FOGZO", "batched"), ("FOGZO", "lean")]


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def run(estimator: str, strategy: str, width: int) -> dict:
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP((width, width, width, 10)), qzo_fx.QuantConfig(weight_bits=2))
    batch = (torch.randn(64, width), torch.randint(0, 10, (64,)))
    opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    qzo_fx.train_step(qm, ce, qzo_fx.STE())(batch)
    opt.step()
    est = qzo_fx.STE() if estimator == "STE" else qzo_fx.FOGZO(total_steps=10, seed=0)
    tiny = qzo_fx.prepare(MLP((8, 8, 8, 10)), qzo_fx.QuantConfig(weight_bits=2))
    tiny_step = qzo_fx.train_step(tiny, ce, est, strategy=strategy or "auto")
    tiny_step((torch.randn(4, 8), torch.randint(0, 10, (4,))))
    # FOGZO's first step has beta = 1 and draws no noise: a second one loads the noise kernel
    # (numba is imported on the first fill, ~55 MiB of code that is no step's memory).
    tiny_step((torch.randn(4, 8), torch.randint(0, 10, (4,))))
    base = _rss_mib()
    step = qzo_fx.train_step(qm, ce, est, strategy=strategy or "auto")
    for _ in range(5):
        step(batch)
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() * 4 for p in qm.parameters()) / 2**20
    largest = max(p.numel() * 4 for p in qm.parameters()) / 2**20
    return {"step": estimator, "strategy": strategy or "-", "extra peak MiB": peak - base,
            "model MiB": params, "largest tensor MiB": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="width 512")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width = 512
    if args.one:
        print(json.dumps(run(args.one[0], None if args.one[1] == "-" else args.one[1], args.width)))
        return
    rows = []
    for estimator, strategy in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--width", str(args.width), "--one", estimator,
                              strategy or "-"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(tabulate(rows, headers="keys", floatfmt=".1f"))


if __name__ == "__main__":
    main()
