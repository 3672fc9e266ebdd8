"""Per-rank memory of a training step on a model sharded with FSDP2 (fully_shard), CPU / gloo.

    python benchmarks/fsdp_memory.py [--width 2048] [--ranks 2]

Each configuration runs in fresh processes (``torchrun --standalone``) on an MLP
width-width-width-10 (2-bit per-channel weights, batch 64 per rank, AdamW): the same model
unsharded in one process, and fully_shard(qm) on 1 and on ``--ranks`` ranks. Per rank:

* ``state MiB``: its parameters, gradients and AdamW moments (local shards under FSDP),
  counted from the tensors;
* ``held MiB``: RSS after a warm-up step minus RSS before the model was built: that state plus
  what the step keeps between steps (reused buffers: a snapshot, directions);
* ``peak MiB``: the highest RSS during 3 more steps (``VmHWM``, reset by ``/proc/self/clear_refs``
  after the warm-up) minus RSS before the model was built: the rank's memory at its peak.

The processes run with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation from 64 KiB up is its
own mapping, returned to the system when freed, so RSS follows the live tensors (glibc's default
keeps freed blocks and moves RSS by tens of MiB from run to run). A tiny model trains two steps
of the same kind first, so the code the step runs (numba's kernels) is loaded before.

A prepared model is one graph that reads its weights itself, so fully_shard applies to its root
(one FSDP unit): every forward gathers all parameters (the whole model, transiently, on each rank).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from tabulate import tabulate

import qzo_fx
from qzo_fx.models import MLP
from qzo_fx.models import classification_loss as ce

CONFIGS = [("STE", "-"), ("FOGZO", "inplace"), ("FOGZO", "lean")]


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS


def _setup(estimator: str, strategy: str, width: int, shard: bool, batch_size: int):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP((width, width, width, 10)), qzo_fx.QuantConfig(weight_bits=2))
    if shard:
        torch.distributed.fsdp.fully_shard(qm)
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = (torch.randn(batch_size, width, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-4)
    est = qzo_fx.STE() if estimator == "STE" else qzo_fx.FOGZO(total_steps=10, seed=0)
    step = qzo_fx.train_step(qm, ce, est, strategy="auto" if strategy == "-" else strategy)

    def train() -> None:
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the state
        step(batch)
        opt.step()
    return qm, opt, step, train


def run(estimator: str, strategy: str, width: int, shard: bool) -> dict:
    tiny = _setup(estimator, strategy, 8, shard, 4)[3]
    tiny()  # load the code paths on a tiny model; FOGZO's first step has beta = 1 and draws no
    tiny()  # noise, the second loads the noise kernel (numba: ~55 MiB of code)
    before = _rss_mib()
    qm, opt, step, train = _setup(estimator, strategy, width, shard, 64)
    train()  # warm-up: gradients, optimizer state, the step's reused buffers
    held = _rss_mib() - before
    _reset_peak()
    for _ in range(3):
        train()
    peak = _rss_mib("VmHWM") - before
    state = sum(_local_bytes(p) + (_local_bytes(p.grad) if p.grad is not None else 0) for p in qm.parameters())
    state += sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {"step": estimator, "strategy": step.stats.strategy or "-", "state MiB": state / 2**20,
            "held MiB": held, "peak MiB": peak}


def _launch(args, ranks: int, estimator: str, strategy: str, shard: bool) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--width", str(args.width), "--one", estimator, strategy, "shard" if shard else "plain"]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        estimator, strategy, mode = args.one
        dist.init_process_group("gloo")
        try:
            row = run(estimator, strategy, args.width, mode == "shard")
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, row)
            if dist.get_rank() == 0:
                for rank, r in enumerate(rows):
                    print(json.dumps({"rank": rank, **r}))
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    params = (2 * args.width * args.width + args.width * 10 + 2 * args.width + 10) * 4 / 2**20
    print(f"MLP {args.width}-{args.width}-{args.width}-10: {params:.1f} MiB of parameters; AdamW; batch 64 per rank")
    table = []
    for label, ranks, shard in (("1 process", 1, False), ("FSDP x1", 1, True), (f"FSDP x{args.ranks}", args.ranks,
                                                                                 True)):
        for estimator, strategy in CONFIGS:
            for row in _launch(args, ranks, estimator, strategy, shard):
                table.append({"run": label, **row})
    print(tabulate(table, headers="keys", floatfmt=".1f"))


if __name__ == "__main__":
    main()
