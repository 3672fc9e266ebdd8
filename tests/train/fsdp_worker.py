"""One rank of the FSDP2 training runs that tests/train/test_fsdp.py checks.

    torchrun --standalone --nproc_per_node 2 -m tests.train.fsdp_worker OUT.pt [CASE ...]

Each case prepares the same model on every rank, shards it with ``fully_shard`` (gloo, CPU),
trains a few steps on this rank's half of each batch through ``qzo_fx.train_step`` and a torch
optimizer, and rank 0 writes the gathered parameters to OUT.pt. Without a process group
(:func:`train` with ``shard=None``) the same function is the one-process reference on the whole
batches.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import qzo_fx
from qzo_fx.errors import TrainStepError

fully_shard = torch.distributed.fsdp.fully_shard


class Net(nn.Module):
    """Rows that do not split evenly over 2 ranks (17, 3), per-channel 2-bit weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 17), nn.Linear(17, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]).float(), batch[1])


def data(steps: int = 4, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 10, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


@dataclass(frozen=True)
class Case:
    estimator: Callable[[], Any]
    strategy: str = "auto"
    optimizer: str = "sgd"
    config: Callable[[], qzo_fx.QuantConfig] = lambda: qzo_fx.QuantConfig(weight_bits=2)
    fsdp: Callable[[], dict] = dict  # fully_shard keyword arguments
    codes: bool = False              # ZOQO: integer codes, no optimizer
    compile: bool = False            # train_step(..., compile=True)


CASES: dict[str, Case] = {
    "ste": Case(qzo_fx.STE, optimizer="adamw"),
    "fogzo": Case(lambda: qzo_fx.FOGZO(n=2, beta_min=0.9, total_steps=4, seed=3)),
    "fogzo-lean": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=4, noise="unit_norm",
                                            normalize="per_tensor"), strategy="lean", optimizer="adamw"),
    "fogzo-share": Case(lambda: qzo_fx.FOGZO(guide_share=0.5, total_steps=4, seed=10)),  # beta from the whole d
    "fogzo-one-sided": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=5, two_sided=False)),
    # eps_float: the biases' perturbation (perturb="all"); the default 1e-3 would magnify the
    # loss's last-bit rounding (the two runs average the batch differently) 1000-fold.
    "nspsa": Case(lambda: qzo_fx.NSPSA(n=2, seed=6, eps_float=0.05)),
    "fogzo-lsq": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=7),
                      config=lambda: qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=2, ste="lsq"))),
    "fogzo-groups": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=8, perturb="all", eps_float=0.05),
                         config=lambda: qzo_fx.QuantConfig(  # fc3: 3 rows x 2 groups of 8
                             weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=8),
                             overrides={"fc[12]": {"weight": {"granularity": "per_channel"}}})),
    "zoqo": Case(lambda: qzo_fx.ZOQO(seed=9), codes=True),
    "fogzo-compiled": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=3), compile=True),
    "fogzo-no-reshard": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=3),
                             fsdp=lambda: {"reshard_after_forward": False}),
    "fogzo-cpu-offload": Case(lambda: qzo_fx.FOGZO(beta_min=0.9, total_steps=4, seed=3),
                              fsdp=lambda: {"offload_policy": torch.distributed.fsdp.CPUOffloadPolicy(
                                  pin_memory=False)}),  # pinned memory needs an accelerator
}


def _bf16(qm):
    fully_shard(qm, mp_policy=torch.distributed.fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    return qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0))


def _uncalled_unit(qm):
    fully_shard(qm.fc1)  # the prepared graph reads fc1.weight itself: FSDP would never gather it
    fully_shard(qm)
    return qzo_fx.train_step(qm, ce, qzo_fx.STE())


def _graph_strategy(qm):
    fully_shard(qm)
    return qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(seed=0), strategy="sequential")


REFUSALS = {"bf16-params": _bf16, "uncalled-unit": _uncalled_unit, "graph-strategy": _graph_strategy}


def train(name: str, shard: Optional[tuple[int, int]] = None, eager: bool = False) -> dict[str, Any]:
    """Train case ``name``; ``shard=(rank, world)``: under FSDP on that rank's part of each batch;
    ``eager``: without compile whatever the case says. Returns the whole parameters (and ZOQO's
    codes) after training, the strategy that ran and how many graphs torch.compile made."""
    case = CASES[name]
    torch.manual_seed(0)  # the same initial weights everywhere
    qm = qzo_fx.prepare(Net(), case.config())
    if case.codes:
        qm = qzo_fx.to_integer_codes(qm)
    if shard is not None:
        fully_shard(qm, **case.fsdp())
    counters.clear()
    step = qzo_fx.train_step(qm, ce, case.estimator(), strategy=case.strategy,
                             compile=case.compile and not eager)
    opt = (torch.optim.AdamW(qm.parameters(), lr=1e-2) if case.optimizer == "adamw"
           else torch.optim.SGD(qm.parameters(), lr=0.1))
    for x, y in data():
        if shard is not None:
            rank, world = shard
            part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            x, y = x[part], y[part]
        opt.zero_grad(set_to_none=True)
        step((x, y))
        if not case.codes:
            opt.step()
    whole = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
             for n, p in qm.named_parameters()}
    whole.update({n: b.clone() for n, b in qm.named_buffers() if n.endswith(".codes")})
    whole["strategy"] = step.stats.strategy
    whole["compiled graphs"] = counters["stats"]["unique_graphs"]
    return whole


def refusal(name: str) -> str:
    """The TrainStepError's message that building the step of set-up ``name`` raises."""
    torch.manual_seed(0)
    try:
        REFUSALS[name](qzo_fx.prepare(Net(), qzo_fx.QuantConfig(weight_bits=2)))
    except TrainStepError as error:
        return str(error)
    return "not refused"


def main(out: str, names: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results: dict[str, Any] = {name: train(name, (rank, world)) for name in names or CASES}
        results["refused"] = {name: refusal(name) for name in REFUSALS}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
