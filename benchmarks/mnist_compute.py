"""Training loss against compute: STE, FOGZO and n-SPSA on the real MNIST subset.

    python benchmarks/mnist_compute.py [--quick] [--out results]

MLP 784-10-10 (d = 7,960 parameters), 2-bit per-channel weights, identity STE, batch 256, AdamW.
FOGZO: n = 1, beta_min = 0.999. n-SPSA: n in {1, 10, 100, 1000, d}, smoothing noise, every
parameter perturbed. Compute is counted in forward-pass equivalents (forward = 1, backward = 2).
Every n-SPSA run gets up to ``--budget`` times FOGZO's compute. Reports, for each n, the compute to
first reach FOGZO's final training loss and its ratio to FOGZO's; writes a plot and a JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

import qzo_fx
from qzo_fx.data import batches, load_mnist_subset
from qzo_fx.models import MLP
from qzo_fx.models import classification_loss as ce

D = 784 * 10 + 10 + 10 * 10 + 10


def run(name: str, estimator, data, steps_cap: int, compute_cap: float, eval_every: int, target: float | None,
        max_seconds: float = float("inf")):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP((784, 10, 10)), qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=2)))
    n = getattr(estimator, "n", 1)
    strategy = "batched" if isinstance(estimator, qzo_fx.NSPSA) and n >= 32 else "sequential"
    step = qzo_fx.train_step(qm, ce, estimator, strategy=strategy, max_chunk=64)
    opt = torch.optim.AdamW(qm.parameters(), lr=3e-3, weight_decay=0.0)
    full = (data.x_train, data.y_train)
    curve, start, reached = [], time.perf_counter(), None
    feed = batches(data.x_train, data.y_train, 256, seed=0, epochs=10**6)
    for i in range(steps_cap):
        opt.zero_grad(set_to_none=True)
        step(next(feed))
        opt.step()
        compute = step.stats.fwd_equivalents
        if i % eval_every == eval_every - 1 or compute >= compute_cap:
            with torch.no_grad():
                loss = float(ce(qm, full))
            curve.append((compute, loss))
            if target is not None and reached is None and loss <= target:
                reached = compute
            if compute >= compute_cap or (target is not None and reached is not None):
                break
            if time.perf_counter() - start > max_seconds:
                break  # the wall-clock cap: the table says so
    return {"name": name, "curve": curve, "steps": step.stats.steps, "compute": step.stats.fwd_equivalents,
            "final_loss": curve[-1][1], "reached": reached, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, n in {1, 10, 100}")
    parser.add_argument("--steps", type=int, default=1500, help="FOGZO and STE steps")
    parser.add_argument("--budget", type=float, default=200.0, help="n-SPSA compute cap, in multiples of FOGZO's")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="wall-clock cap per n-SPSA run")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    steps = 150 if args.quick else args.steps
    budget = 20.0 if args.quick else args.budget
    ns = (1, 10, 100) if args.quick else (1, 10, 100, 1000, D)
    data = load_mnist_subset()
    started = time.perf_counter()
    ste = run("STE", qzo_fx.STE(), data, steps, float("inf"), max(steps // 30, 1), None)
    fogzo = run("FOGZO n=1", qzo_fx.FOGZO(beta_min=0.999, total_steps=steps, seed=0), data, steps, float("inf"),
                max(steps // 30, 1), None)
    target, cap = fogzo["final_loss"], budget * fogzo["compute"]
    results = [ste, fogzo]
    for n in ns:
        eval_every = max(int(cap / (2 * n) / 40), 1)
        result = run(f"n-SPSA n={n}", qzo_fx.NSPSA(n=n, seed=0), data, 10**9, cap, eval_every, target,
                     20.0 if args.quick else args.max_seconds)
        results.append(result)
        print(f"{result['name']}: {result['steps']} steps, compute {result['compute']}, "
              f"loss {result['final_loss']:.4f}, "
              f"{result['seconds']:.0f} s", flush=True)
    rows = []
    for r in results:
        ratio = "-" if r["name"].startswith(("STE", "FOGZO")) else (
            f"{r['reached'] / fogzo['compute']:.1f}x" if r["reached"]
            else f"not within {r['compute'] / fogzo['compute']:.0f}x" + (" (time cap)" if r["compute"] < cap else ""))
        rows.append([r["name"], r["steps"], r["compute"], f"{r['final_loss']:.4f}", ratio, f"{r['seconds']:.0f}"])
    print(f"\nMLP 784-10-10 (d = {D}), 2-bit weights, MNIST subset; FOGZO final training loss {target:.4f}")
    print(tabulate(rows, headers=["method", "steps", "compute (fwd-eq)", "final train loss",
                                  "compute to FOGZO's loss / FOGZO's", "seconds"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist_compute.json").write_text(json.dumps({"results": results, "seconds": time.perf_counter() - started}))
    _plot(results, out / "mnist_compute.png")
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s; wrote {out / 'mnist_compute.json'} and {out / 'mnist_compute.png'}")


def _plot(results, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, label=r["name"], lw=2 if not r["name"].startswith("n-SPSA") else 1)
    ax.set_xscale("log")
    ax.set_xlabel("compute (forward-pass equivalents: fwd = 1, bwd = 2)")
    ax.set_ylabel("training loss (full training set)")
    ax.set_title("MLP 784-10-10, 2-bit weights, MNIST subset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
