"""Where a FOGZO step's time goes, and what each speed trick saves (CPU, realistic models).

    python benchmarks/step_phases.py [--models resnet18,deit_tiny,llama] [--rounds 12] [--ab] [--clock cpu]

Phases: timers around the base pass, the direction (noise and guide), the branches and the
estimate of a sequential FOGZO step, alternating with STE steps. ``--ab``: each trick against its
absence, the two steps alternated round-robin in one process (each round: A twice, B twice,
the first of each pair dropped), FOGZO two-sided at the start of the schedule, AdamW included:

* compiled noise   -- the counter stream filled by numba vs torch's CPU generator;
* compiled q/dq    -- the sequential prologue's fused perturb + q/dq vs torch's in-place ops;
* hoisted q/dq     -- weight q/dq in a prologue before the graph vs in the branch graph;
* conv reuse       -- a first convolution chain from the base pass vs computed again;
* sequential       -- the branch graph vs the parameters written in place (inplace).
"""
from __future__ import annotations

import argparse
import statistics
import time

from step_overhead import MODELS, prepared, ratio, trained
from timing import interleaved_rounds, medians

import qzo_fx
from qzo_fx.train import compiled, directions
from qzo_fx.train.graphs import BranchGraphs
from qzo_fx.train.strategies import Sequential


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


def phases(name: str, rounds: int) -> None:
    _, qm, batch, loss_fn = prepared(name, "cpu", qzo_fx.QuantConfig(weight_bits=2))
    ste = qzo_fx.train_step(qm, loss_fn, qzo_fx.STE())
    fogzo = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(total_steps=10**6, seed=0), strategy="sequential")
    record: dict = {}
    _timed(fogzo, "base_pass", "base pass (fwd + bwd)", record)
    _timed(directions.Directions, "__init__", "guide norms", record)
    _timed(directions.Directions, "materialize", "direction (noise + guide)", record)
    _timed(fogzo.strategy, "run", "branches", record)
    _timed(fogzo, "write_estimate", "estimate into .grad", record)
    totals = {"STE": [], "FOGZO": []}
    for _ in range(rounds):
        for label, step in (("STE", ste), ("FOGZO", fogzo)):
            qm.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(batch)
            totals[label].append(time.perf_counter() - start)
    skip = rounds // 3
    med = {k: statistics.median(v[skip:]) * 1e3 for k, v in {**totals, **record}.items()}
    print(f"\n== {name}: STE {med['STE']:.1f} ms, FOGZO (sequential, 2-sided) {med['FOGZO']:.1f} ms "
          f"= {med['FOGZO'] / med['STE']:.2f}x (medians of {rounds - skip} alternating steps)")
    for label in record:
        print(f"   {label:28s} {med[label]:8.2f} ms")
    print(f"   {'rest (Python, checks)':28s} {med['FOGZO'] - sum(med[k] for k in record):8.2f} ms")


def _without(*kernels):
    """A step function run with the compiled kernels ``kernels`` off."""
    def wrap(fn):
        def go():
            with compiled.disabled(*kernels):
                fn()
        return go
    return wrap


def _unhoisted(step) -> None:
    """The step's sequential strategy on the plain branch graph (q/dq in the graph, no reuse)."""
    step.graphs.taps = None
    step.strategy = Sequential(step.strategy.ctx, BranchGraphs(step.model, step.names).getter("lifted"))


def _no_reuse(step) -> None:
    step.graphs.taps = None  # the base pass runs the model; branches the whole chain
    step.graphs._graphs.clear()


def run_ab(name: str, device: str, rounds: int, clock: str = "wall") -> None:
    _, qm, batch, loss_fn = prepared(name, device, qzo_fx.QuantConfig(weight_bits=2))

    def fogzo(strategy="sequential", noise="auto", change=None):
        step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(total_steps=10**6, seed=0), strategy=strategy, noise=noise)
        if change is not None:
            change(step)
        return trained(qm, lambda: step(batch), device)

    ste = qzo_fx.train_step(qm, loss_fn, qzo_fx.STE())
    fns = {"STE": trained(qm, lambda: ste(batch), device), "all tricks": fogzo()}
    # trick -> (the step without it, the step it is compared with)
    pairs = {"compiled noise": (fogzo(noise="torch"), "all tricks"),
             "compiled q/dq": (_without("perturb_quantize", "perturb_quantize_threaded")(fogzo()), "all tricks"),
             "conv reuse": (fogzo(change=_no_reuse), "all tricks"),
             "hoisted q/dq": (fogzo(change=_unhoisted), "without conv reuse"),
             "sequential": (fogzo(strategy="inplace"), "all tricks")}
    fns.update({f"without {k}": fn for k, (fn, _) in pairs.items()})
    samples = interleaved_rounds(fns, rounds, warmup=1, block=2, clock=clock)
    t = medians(samples)
    print(f"\n== A/B on {name}: STE {t['STE']*1e3:.1f} ms; FOGZO with every trick {t['all tricks']*1e3:.1f} ms "
          f"= {ratio(samples, 'all tricks', 'STE')[0]:.3f}x STE", flush=True)
    for trick, (_, base) in pairs.items():
        without = ratio(samples, f"without {trick}", "STE")
        gain = [a - b for a, b in zip(ratio(samples, f"without {trick}", "STE"), ratio(samples, base, "STE"))]
        saved = ratio(samples, f"without {trick}", base)
        print(f"   without {trick:15s} {t['without ' + trick]*1e3:8.1f} ms = {without[0]:.3f}x STE: the trick "
              f"saves {gain[0]:+.3f}x STE ({base} / without = 1/{saved[0]:.3f} [{saved[1]:.2f}-{saved[2]:.2f}])",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,deit_tiny,llama")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--ab", action="store_true")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: process CPU time, for a machine shared with other jobs (OMP_WAIT_POLICY=PASSIVE)")
    args = parser.parse_args()
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name}: choose from {sorted(MODELS)}")
        if args.ab:
            run_ab(name, "cpu", args.rounds, args.clock)
        else:
            phases(name, args.rounds)


if __name__ == "__main__":
    main()
