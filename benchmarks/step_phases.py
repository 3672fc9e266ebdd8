"""Where a FOGZO step's time goes, phase by phase, against an STE step (CPU).

    python benchmarks/step_phases.py [--model mlp|cnn|vit|llama] [--one-sided] [--steps 300]

Alternates STE and FOGZO (sequential) steps on the same prepared model and reports the median
of each phase measured inside the FOGZO step: the base pass (forward + backward), the step's
words (signs, stream keys) and guide norms (``Directions.__init__``), the direction
(``materialize``), the branches and the estimate written to ``.grad``. The first third of the steps is dropped (warm-up).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import qzo_fx
from qzo_fx.train import zo_math
from step_overhead import reference_models


def _timed(owner, name: str, label: str, record: dict) -> None:
    """Wrap ``owner.name`` so that each call's duration is appended to ``record[label]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record.setdefault(label, []).append(time.perf_counter() - start)
    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn", "vit", "llama"))
    parser.add_argument("--one-sided", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    factory, batch, loss_fn = reference_models()[args.model]
    torch.manual_seed(0)
    qm = qzo_fx.prepare(factory(), qzo_fx.QuantConfig(weight_bits=2), example_inputs=(batch[0],))
    ste = qzo_fx.train_step(qm, loss_fn, qzo_fx.STE())
    fogzo = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(total_steps=10**6, seed=0, two_sided=not args.one_sided),
                              strategy="sequential")
    phases: dict = {}
    _timed(fogzo, "_ste", "base pass (fwd + bwd)", phases)
    _timed(zo_math.Directions, "__init__", "step words + guide norms", phases)
    _timed(zo_math.Directions, "materialize", "direction (noise + guide)", phases)
    _timed(fogzo.runner, "losses", "branches", phases)
    _timed(fogzo, "_write", "estimate into .grad", phases)
    totals = {"ste": [], "fogzo": []}
    for _ in range(args.steps):
        for name, step in (("ste", ste), ("fogzo", fogzo)):
            qm.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(batch)
            totals[name].append(time.perf_counter() - start)
    skip = args.steps // 3
    med = {name: statistics.median(t[skip:]) * 1e6 for name, t in {**totals, **phases}.items()}
    sides = "one-sided" if args.one_sided else "two-sided"
    print(f"{args.model}, FOGZO {sides}: STE step {med['ste']:.0f} us, FOGZO step {med['fogzo']:.0f} us "
          f"= {med['fogzo'] / med['ste']:.2f}x (medians of {args.steps - skip} alternating steps)")
    for label in phases:
        print(f"   {label:28s} {med[label]:7.0f} us")
    print(f"   {'rest (Python, checks)':28s} {med['fogzo'] - sum(med[label] for label in phases):7.0f} us")


if __name__ == "__main__":
    main()
