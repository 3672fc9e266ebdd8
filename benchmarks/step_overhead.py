"""Wall time of a training step per estimator and branch strategy, as ratios measured in one run.

    python benchmarks/step_overhead.py [--quick] [--models mlp,cnn,vit,llama] [--device cuda]

Ratios: STE QAT step / float step; FOGZO (two-sided, one-sided) / STE; n-SPSA K=2n branches,
batched vs sequential throughput. Each ratio is the median over rounds of the ratio within a
round (the two callables timed seconds apart), so the VM's slow drift cancels. Targets: FOGZO two-sided <= 1.70x STE, one-sided <= 1.40x.
"""
from __future__ import annotations

import argparse

import torch

import qzo_fx
from qzo_fx.models import MLP, SmallCNN, TinyLlama, TinyViT, classification_loss as ce, next_token_loss
from timing import interleaved_rounds, medians, paired_ratio

BLOCK = 3  # steps per turn, the first dropped: steady state, as in a training loop


def reference_models(device="cpu"):
    """name -> (model factory, batch, loss_fn)."""
    images = lambda n: (torch.randn(n, 1, 28, 28, device=device), torch.randint(0, 10, (n,), device=device))
    text = (torch.randint(0, 128, (16, 64), device=device), torch.randint(0, 128, (16, 64), device=device))
    return {
        "mlp": (MLP, images(256), ce),
        "cnn": (SmallCNN, images(64), ce),
        "vit": (TinyViT, images(64), ce),
        "llama": (TinyLlama, text, next_token_loss),
    }


def _synchronized(fn, device):
    """``fn`` that returns once its GPU work is done (a CUDA call returns at launch)."""
    if torch.device(device).type != "cuda":
        return fn

    def go():
        fn()
        torch.cuda.synchronize(device)
    return go


def step_fns(factory, batch, loss_fn, device="cpu"):
    """The callables compared for one model: float, STE (W8A8 and W2), FOGZO per strategy."""
    torch.manual_seed(0)
    model = factory().to(device)
    w8a8 = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(batch[0],))
    w2 = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=2), example_inputs=(batch[0],))

    def run(step, m):
        def go():
            m.zero_grad(set_to_none=True)
            step(batch)
        return _synchronized(go, device)

    fns = {"float": run(lambda b: loss_fn(model, b).backward(), model),
           "ste-w8a8": run(qzo_fx.train_step(w8a8, loss_fn, qzo_fx.STE()), w8a8),
           "ste-w2": run(qzo_fx.train_step(w2, loss_fn, qzo_fx.STE()), w2)}
    steps = {}
    for strategy in ("inplace", "sequential", "batched", "auto"):
        for two_sided in (True, False):
            est = qzo_fx.FOGZO(total_steps=10**6, seed=0, two_sided=two_sided)
            key = f"fogzo-{'2s' if two_sided else '1s'}-{strategy}"
            steps[key] = qzo_fx.train_step(w2, loss_fn, est, strategy=strategy)
            fns[key] = run(steps[key], w2)
            while steps[key].runner.strategy == "auto":  # time what auto settles on, not its trials
                fns[key]()
    # The runs above sit at the start of the schedule (beta ~ 1). At its end (beta = beta_min)
    # the noise part is largest, and so is the share of weights whose code a branch changes.
    for two_sided in (True, False):
        est = qzo_fx.FOGZO(beta_min=0.999, schedule="constant", seed=0, two_sided=two_sided)
        key = f"fogzo-{'2s' if two_sided else '1s'}-sequential@beta_min"
        steps[key] = qzo_fx.train_step(w2, loss_fn, est, strategy="sequential")
        fns[key] = run(steps[key], w2)
    return fns, steps


def nspsa_throughput(factory, batch, loss_fn, ks, rounds, device="cpu"):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(factory(), qzo_fx.QuantConfig(weight_bits=2)).to(device)
    fns = {}
    for k in ks:
        for strategy in ("sequential", "batched"):
            step = qzo_fx.train_step(qm, loss_fn, qzo_fx.NSPSA(n=k // 2, seed=0), strategy=strategy)
            fns[(k, strategy)] = _synchronized((lambda s: lambda: s(batch))(step), device)
    return interleaved_rounds(fns, rounds, warmup=1, block=BLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds; n-SPSA at K <= 8 only")
    parser.add_argument("--models", default="mlp,cnn,vit,llama")
    parser.add_argument("--device", default="cpu", help="cpu (the targets' reference) or cuda")
    args = parser.parse_args()
    rounds = 7 if args.quick else 40
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}); {rounds} interleaved rounds of {BLOCK} "
          "back-to-back steps (first dropped): median ms, and the median over rounds of each round's ratio")
    table = reference_models(args.device)
    for name in args.models.split(","):
        factory, batch, loss_fn = table[name]
        fns, steps = step_fns(factory, batch, loss_fn, args.device)
        samples = interleaved_rounds(fns, rounds, block=BLOCK)
        t = medians(samples)
        print(f"\n== {name}: float {t['float']*1e3:.2f} ms | STE W8A8 {t['ste-w8a8']*1e3:.2f} ms "
              f"= {paired_ratio(samples, 'ste-w8a8', 'float'):.2f}x float | STE W2 {t['ste-w2']*1e3:.2f} ms")
        for key, value in t.items():
            if key.startswith("fogzo"):
                print(f"   {key:31s} {value*1e3:7.2f} ms  {paired_ratio(samples, key, 'ste-w2'):5.2f}x STE")
        print(f"   auto chose: {steps['fogzo-2s-auto'].runner.strategy} (2s), {steps['fogzo-1s-auto'].runner.strategy} (1s)")
    ks = (2, 8) if args.quick else (2, 8, 32, 64)
    factory, batch, loss_fn = table["mlp"]
    samples = nspsa_throughput(factory, batch, loss_fn, ks, 3 if args.quick else 7, args.device)
    thr = medians(samples)
    print("\n== n-SPSA on the MLP (K = 2n branches): ms per step; batched throughput / sequential")
    for k in ks:
        seq, bat = thr[(k, "sequential")], thr[(k, "batched")]
        speedup = paired_ratio(samples, (k, "sequential"), (k, "batched"))
        print(f"   K={k:3d}  sequential {seq*1e3:8.2f} ms  batched {bat*1e3:8.2f} ms  speed-up {speedup:4.2f}x")


if __name__ == "__main__":
    main()
