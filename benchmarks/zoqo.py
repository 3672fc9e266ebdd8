"""ZOQO vs ZO-SignSGD vs n-SPSA vs STE on a small model on scikit-learn digits.

    python benchmarks/zoqo.py [--quick] [--steps N]

Same model (MLP 64-32-10, 8-bit per-channel weights), same batches and number of steps for every
method. Reports test accuracy, final training loss, compute (forward-pass equivalents), wall
time, the bytes of training state held in tensors (weights or codes, gradients, optimizer state,
step workspace) and the peak RSS of the process (each method runs in its own process).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from tabulate import tabulate

import qzo_fx
from qzo_fx.data import batches, load_digits
from qzo_fx.fit import accuracy
from qzo_fx.models import MLP
from qzo_fx.models import classification_loss as ce

METHODS = {
    # name: (estimator factory, optimizer factory or None, integer codes?)
    "STE": (lambda: qzo_fx.STE(), lambda p: torch.optim.AdamW(p, lr=3e-3), False),
    "n-SPSA (n=1)": (lambda: qzo_fx.NSPSA(n=1, seed=0), lambda p: torch.optim.AdamW(p, lr=1e-3), False),
    "ZO-SignSGD (elementwise)": (lambda: qzo_fx.ZOSign(n=1, seed=0), lambda p: torch.optim.SGD(p, lr=2e-4), False),
    "ZO-SGD-Sign (scalar)": (lambda: qzo_fx.ZOSign(n=1, variant="scalar", seed=0),
                             lambda p: torch.optim.SGD(p, lr=2e-4), False),
    "ZOQO": (lambda: qzo_fx.ZOQO(noise="uniform", seed=0), None, True),
}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_one(name: str, steps: int) -> dict:
    data = load_digits()
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP((64, 32, 10)), qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=8)))
    make_estimator, make_optimizer, codes = METHODS[name]
    if codes:
        qzo_fx.to_integer_codes(qm)
    step = qzo_fx.train_step(qm, ce, make_estimator(), strategy="sequential")
    optimizer = make_optimizer(qm.parameters()) if make_optimizer else None
    epochs = steps // (len(data.x_train) // 64) + 1
    start, done = time.perf_counter(), 0
    for batch in batches(data.x_train, data.y_train, 64, epochs=epochs):
        if done == steps:
            break
        if optimizer:
            optimizer.zero_grad(set_to_none=False)
        step(batch)
        if optimizer:
            optimizer.step()
        done += 1
    seconds = time.perf_counter() - start
    state = list(qm.parameters()) + list(qm.buffers()) + [p.grad for p in qm.parameters()]
    if optimizer:
        state += [v for s in optimizer.state.values() for v in s.values()]
    with torch.no_grad():
        loss = float(ce(qm, (data.x_train, data.y_train)))
    return {"method": name, "steps": done, "test accuracy": accuracy(qm, data.x_test, data.y_test),
            "train loss": loss, "fwd-eq": step.stats.fwd_equivalents, "seconds": seconds,
            "state KiB": (tensor_bytes(state) + step.workspace.nbytes()) / 1024,
            "peak RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 steps")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 500 if args.quick else args.steps
    if args.method:
        print(json.dumps(run_one(args.method, steps)))
        return
    rows = []
    for name in METHODS:
        out = subprocess.run([sys.executable, __file__, "--method", name, "--steps", str(steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"MLP 64-32-10, 8-bit weights, digits, batch 64, {steps} steps each")
    print(tabulate(rows, headers="keys", floatfmt=".3f"))


if __name__ == "__main__":
    main()
