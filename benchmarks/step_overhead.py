"""Wall time of a training step on realistic models, as ratios measured in one run.

    python benchmarks/step_overhead.py [--quick] [--models resnet18,deit_tiny,llama] [--device cuda] [--clock cpu]

Models (random init, timm / transformers configs): ResNet-18 at 16x3x128x128, DeiT-tiny at
128 px (batch 16), a LLaMA (hidden 256, 4 layers, 4 heads, vocabulary 2048) at 8x128 tokens.
Every step includes the optimizer step (AdamW). Ratios: STE W8A8 step / float step; FOGZO
(two-sided, one-sided; n = 1, 2-bit weights, at the start of the schedule and at beta_min)
/ STE W2 step; on ``--device cuda`` also batched / sequential n-SPSA throughput at K = 64.
Each ratio is the median over rounds of the ratio within a round (the callables timed
round-robin, seconds apart), with its min-max over rounds. Targets: FOGZO two-sided <= 1.70x
(1.75x on a GPU), one-sided <= 1.40x, STE W8A8 <= 1.10x float.

What each speed trick saves: ``python benchmarks/step_phases.py --ab`` (docs/performance.md).

``--compile``: ``train_step(..., compile=True)`` against eager on each model: the STE step and
FOGZO (two-sided, beta_min = 0.999 held constant) with ``sequential`` and ``inplace`` branches,
interleaved; one step of eager and compiled FOGZO from the same seed is compared (losses, G), its
wall time being the model's compilation (cold where TORCHINDUCTOR_CACHE_DIR is empty), and the
first call of each compiled step after it is timed apart too (what it compiles on top).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved_rounds, medians

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo's torchvision shim
import qzo_fx
from tests.zoo.cases import torchvision_shim

BLOCK = 2  # steps per turn, the first dropped: steady state, as in a training loop


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]


def image_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def token_loss(model, batch):
    return F.cross_entropy(_logits(model(batch[0])).flatten(0, 1), batch[1].flatten())


def resnet18(device):
    torchvision_shim()
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=100)
    return model, (torch.randn(16, 3, 128, 128, device=device), torch.randint(0, 100, (16,), device=device)), image_loss


def deit_tiny(device):
    torchvision_shim()
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=100, img_size=128)
    return model, (torch.randn(16, 3, 128, 128, device=device), torch.randint(0, 100, (16,), device=device)), image_loss


def llama(device):
    torchvision_shim()  # transformers imports torchvision when it is installed
    import transformers

    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      use_cache=False)
    ids = torch.randint(0, 2048, (8, 128), device=device)
    return transformers.LlamaForCausalLM(config), (ids, torch.roll(ids, -1, 1)), token_loss


MODELS = {"resnet18": resnet18, "deit_tiny": deit_tiny, "llama": llama}


def _synchronized(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def go():
        fn()
        torch.cuda.synchronize(device)
    return go


def trained(model, step, device, lr=1e-5):
    """One training step as a user runs it: zero_grad, the step, AdamW."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def go():
        opt.zero_grad(set_to_none=True)
        step()
        opt.step()
    return _synchronized(go, device)


def prepared(name, device, config):
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[name](device)
    model = model.to(device)
    qm = qzo_fx.prepare(model, config, example_inputs=(batch[0],))
    qm.train()
    return model, qm, batch, loss_fn


def step_fns(name, device):
    """The callables compared for one model: float, STE (W8A8 and W2), FOGZO per setting."""
    model, w8a8, batch, loss_fn = prepared(name, device, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8))
    _, w2, _, _ = prepared(name, device, qzo_fx.QuantConfig(weight_bits=2))
    model.train()
    fns = {"float": trained(model, lambda: loss_fn(model, batch).backward(), device)}
    ste8 = qzo_fx.train_step(w8a8, loss_fn, qzo_fx.STE())
    fns["ste-w8a8"] = trained(w8a8, lambda: ste8(batch), device)
    ste2 = qzo_fx.train_step(w2, loss_fn, qzo_fx.STE())
    fns["ste-w2"] = trained(w2, lambda: ste2(batch), device)
    steps = {}
    for label, settings in (("2s", {}), ("1s", dict(two_sided=False)),
                            ("2s@beta_min", dict(beta_min=0.999, schedule="constant")),
                            ("1s@beta_min", dict(beta_min=0.999, schedule="constant", two_sided=False))):
        est = qzo_fx.FOGZO(**{"total_steps": 10**6, "seed": 0, **settings})
        step = steps[label] = qzo_fx.train_step(w2, loss_fn, est, strategy="auto")
        fns[f"fogzo-{label}"] = trained(w2, (lambda s: lambda: s(batch))(step), device)
        while step.strategy.chosen == "auto":  # time what auto settles on, not its trials
            fns[f"fogzo-{label}"]()
    return fns, steps


def ratio(samples, name, base):
    """(median, min, max) over rounds of the within-round ratio of mean times."""
    values = [statistics.fmean(a) / statistics.fmean(b) for a, b in zip(samples[name], samples[base])]
    return statistics.median(values), min(values), max(values)


def _fmt(r):
    return f"{r[0]:.3f}x [{r[1]:.2f}-{r[2]:.2f}]"


def report(name, samples, steps):
    t = medians(samples)
    print(f"\n== {name}: float {t['float']*1e3:.1f} ms | STE W8A8 {t['ste-w8a8']*1e3:.1f} ms "
          f"= {_fmt(ratio(samples, 'ste-w8a8', 'float'))} float | STE W2 {t['ste-w2']*1e3:.1f} ms", flush=True)
    for key in [k for k in t if k.startswith("fogzo")]:
        label = key[len("fogzo-"):]
        print(f"   FOGZO {label:12s} {t[key]*1e3:8.1f} ms  {_fmt(ratio(samples, key, 'ste-w2'))} STE "
              f"(auto: {steps[label].strategy.chosen})", flush=True)


def nspsa_throughput(device, rounds, k=64):
    """Batched vs sequential n-SPSA at K = k branches on the DeiT (the GPU target)."""
    _, qm, batch, loss_fn = prepared("deit_tiny", device, qzo_fx.QuantConfig(weight_bits=2))
    fns = {}
    for strategy in ("sequential", "batched"):
        step = qzo_fx.train_step(qm, loss_fn, qzo_fx.NSPSA(n=k // 2, seed=0), strategy=strategy, max_chunk=16)
        fns[strategy] = _synchronized((lambda s: lambda: s(batch))(step), device)
    samples = interleaved_rounds(fns, rounds, warmup=1, block=1)
    r = ratio(samples, "sequential", "batched")
    print(f"\n== n-SPSA K={k} on deit_tiny: batched throughput / sequential = {_fmt(r)}")


COMPILED_FOGZO = dict(beta_min=0.999, schedule="constant", seed=0)


def compile_fns(name, device):
    """Eager and compiled steps of one model (each on its own prepared copy), and the first-call
    wall time of each compiled one (what it compiles beyond the graphs compiled before, plus a step)."""
    fns, first = {}, {}
    for label, estimator, strategy in (("ste", qzo_fx.STE, "auto"), ("fogzo-seq", "fogzo", "sequential"),
                                       ("fogzo-inplace", "fogzo", "inplace")):
        for compiled in (False, True):
            _, qm, batch, loss_fn = prepared(name, device, qzo_fx.QuantConfig(weight_bits=2))
            est = qzo_fx.FOGZO(**COMPILED_FOGZO) if estimator == "fogzo" else estimator()
            step = qzo_fx.train_step(qm, loss_fn, est, strategy=strategy, compile=compiled)
            key = label + ("-compiled" if compiled else "")
            fns[key] = trained(qm, (lambda s, b: lambda: s(b))(step, batch), device)
            if compiled:
                start = time.perf_counter()
                fns[key]()
                first[key] = time.perf_counter() - start
    return fns, first


def compiled_estimate(name, device):
    """One FOGZO step (sequential) from the same seed, eager and compiled: (|d loss|, max |d branch
    loss|, max |dG| / max |G|, max |dG|, wall seconds of the compiled step: the model's first
    compilation in this process, base forward + backward and the branch graph)."""
    out = []
    for compiled in (False, True):
        _, qm, batch, loss_fn = prepared(name, device, qzo_fx.QuantConfig(weight_bits=2))
        step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(**COMPILED_FOGZO), strategy="sequential", compile=compiled)
        torch.manual_seed(1)
        start = time.perf_counter()
        loss = float(step(batch))
        seconds = time.perf_counter() - start
        out.append((loss, step.stats.last_branch_losses, [p.grad.clone() for p in step.params]))
    (le, be, ge), (lc, bc, gc) = out
    dg = max(float((a - b).abs().max()) for a, b in zip(ge, gc))
    return (abs(le - lc), max(abs(a - b) for a, b in zip(be, bc)), dg / max(float(g.abs().max()) for g in ge), dg,
            seconds)


def compile_report(name, device, rounds, clock):
    d_loss, d_branch, rel, dg, first = compiled_estimate(name, device)
    print(f"\n== {name}: same seed, eager vs compiled: |d loss| {d_loss:.2e}, max |d branch loss| {d_branch:.2e}, "
          f"max |dG| {dg:.2e} ({rel:.2e} of max |G|); first compiled FOGZO step {first:.1f} s wall "
          "(a cold compile with an empty TORCHINDUCTOR_CACHE_DIR)", flush=True)
    fns, first = compile_fns(name, device)
    samples = interleaved_rounds(fns, rounds, warmup=1, block=BLOCK, clock=clock)
    t = medians(samples)
    for label in ("ste", "fogzo-seq", "fogzo-inplace"):
        key = label + "-compiled"
        print(f"   {label:14s} eager {t[label]*1e3:8.1f} ms  compiled {t[key]*1e3:8.1f} ms  compiled/eager "
              f"{_fmt(ratio(samples, key, label))}  first compiled call {first[key]:.1f} s wall", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--models", default="resnet18,deit_tiny,llama")
    parser.add_argument("--device", default="cpu", help="cpu (the targets' reference) or cuda")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: process CPU time, for a machine shared with other jobs (OMP_WAIT_POLICY=PASSIVE)")
    parser.add_argument("--compile", action="store_true", help="compile=True against eager (see above)")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}); {rounds} interleaved rounds of {BLOCK} back-to-back "
          f"steps (first dropped), {args.clock} clock; ratios: median [min-max] over rounds of each round's ratio",
          flush=True)
    if args.compile:
        for name in args.models.split(","):
            compile_report(name, args.device, rounds, args.clock)
        return
    for name in args.models.split(","):
        fns, steps = step_fns(name, args.device)
        report(name, interleaved_rounds(fns, rounds, warmup=1, block=BLOCK, clock=args.clock), steps)
    if torch.device(args.device).type == "cuda":
        nspsa_throughput(args.device, rounds)


if __name__ == "__main__":
    main()
