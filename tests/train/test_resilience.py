"""Determinism, checkpoint/resume, faults and DDP for train_step."""
from __future__ import annotations

import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx

STRATEGIES = ("inplace", "sequential", "batched")


class Net(nn.Module):
    def __init__(self, dropout=0.2):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(10, 16), nn.Dropout(dropout), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _data(n=8, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 10, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def _setup(strategy="sequential", dropout=0.2, seed=1):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Net(dropout), qzo_fx.QuantConfig(weight_bits=2))
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=0.9, total_steps=8, seed=seed), strategy=strategy)
    return qm, step, torch.optim.AdamW(qm.parameters(), lr=1e-2)


def _train(qm, step, opt, data):
    losses = []
    for batch in data:
        opt.zero_grad(set_to_none=True)
        losses.append(float(step(batch)))
        opt.step()
    return losses


@pytest.mark.parametrize("strategy", STRATEGIES + ("lean",))
def test_same_seed_same_losses(strategy):
    runs = []
    for _ in range(2):
        qm, step, opt = _setup(strategy)
        torch.manual_seed(5)
        runs.append((_train(qm, step, opt, _data()), qm.get_parameter("fc1.weight").detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_resume_is_bitwise_identical():
    data = _data()
    qm, step, opt = _setup()
    torch.manual_seed(5)
    _train(qm, step, opt, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": qm.state_dict(), "opt": opt.state_dict(), "step": step.state_dict()}, buffer)
    uninterrupted = _train(qm, step, opt, data[4:])
    final = {k: v.clone() for k, v in qm.state_dict().items()}

    qm2, step2, opt2 = _setup(seed=99)  # a different seed: the checkpoint's must win
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    qm2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    step2.load_state_dict(checkpoint["step"])
    assert _train(qm2, step2, opt2, data[4:]) == uninterrupted
    for key, value in qm2.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert step2.stats.steps == 8


def test_resume_with_another_estimator_is_refused():
    _, step, _ = _setup()
    _, other, _ = _setup()
    state = step.state_dict()
    state["estimator"] = "NSPSA(n=1)"
    with pytest.raises(qzo_fx.TrainStepError, match="same estimator"):
        other.load_state_dict(state)


def test_interrupt_during_inplace_branch_restores_parameters():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Net(0.0), qzo_fx.QuantConfig(weight_bits=2))
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the second branch: parameters are perturbed in place right now
            raise KeyboardInterrupt
        return ce(model, batch)

    before = {k: v.clone() for k, v in qm.state_dict().items()}
    step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(seed=0), strategy="inplace")
    with pytest.raises(KeyboardInterrupt):
        step(_data(1)[0])
    for key, value in qm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_wrong_batch_fails_before_anything_changes():
    qm, step, opt = _setup()
    step(_data(1)[0])
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    with pytest.raises(qzo_fx.BatchError, match="failed on a batch of shapes"):
        step((torch.randn(16, 12), torch.randint(0, 3, (16,))))  # 12 features: the model takes 10
    with pytest.raises(qzo_fx.BatchError, match="do not match the first batch"):
        step((torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 3, (16,))))
    assert all(torch.equal(v, before[k]) for k, v in qm.state_dict().items())


class _Clips(nn.Module):
    """Audio-like: a float (batch, time) input whose length varies from batch to batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv1d(1, 8, 5), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x.unsqueeze(1)))).mean(-1))


@pytest.mark.parametrize("estimator", [lambda: qzo_fx.STE(), lambda: qzo_fx.FOGZO(seed=0)], ids=["STE", "FOGZO"])
def test_float_inputs_may_change_length_from_batch_to_batch(estimator):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(_Clips(), qzo_fx.QuantConfig(weight_bits=4, activation_bits=8),
                        example_inputs=(torch.randn(4, 400),)).train()
    step = qzo_fx.train_step(qm, ce, estimator())
    for length in (400, 600, 240):  # each batch padded to its longest clip
        loss = step((torch.randn(4, length), torch.randint(0, 3, (4,))))
        assert torch.isfinite(loss)
    stats = qm.bn.running_mean.clone()
    with pytest.raises(qzo_fx.BatchError, match="failed on a batch of shapes"):
        step((torch.randn(4, 2), torch.randint(0, 3, (4,))))  # shorter than the kernel
    assert torch.equal(qm.bn.running_mean, stats)


# ---------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        qm, _, _ = _setup(dropout=0.0, seed=None)  # no seed given: rank 0's drawn seed is broadcast
        torch.manual_seed(100 + rank)               # ranks draw differently unless the step syncs
        ddp = nn.parallel.DistributedDataParallel(qm)
        step = qzo_fx.train_step(ddp, ce, qzo_fx.FOGZO(beta_min=0.9, total_steps=8), strategy="sequential")
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for x, y in data:
            shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            opt.zero_grad(set_to_none=True)
            step((x[shard], y[shard]))
            opt.step()
        out[rank] = {k: v.clone() for k, v in qm.state_dict().items()}
        out[f"seed{rank}"] = step.base_seed
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_agree_and_match_one_process():
    data = _data(n=4, batch=16)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), data, out), nprocs=2, join=True)
        rank0, rank1, seed = dict(out[0]), dict(out[1]), out["seed0"]
        assert out["seed1"] == seed
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # One process on the concatenated batches with the same seed follows the same trajectory.
    torch.manual_seed(0)
    qm = qzo_fx.prepare(Net(0.0), qzo_fx.QuantConfig(weight_bits=2))
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(beta_min=0.9, total_steps=8, seed=seed), strategy="sequential")
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    _train(qm, step, opt, data)
    for key, value in qm.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)
