"""FSDP2: a prepared model sharded with fully_shard trains through train_step on 2 CPU ranks
(gloo, torchrun --standalone) and ends where one process on the concatenated batches ends.

The two runs differ only in float rounding: a branch loss is the mean over ranks of half-batch
means (one process: the whole batch's mean), and the STE gradient is reduce-scattered. Finite
differences divide a loss's last-bit rounding (~1e-7) by eps, so the perturbation sizes are kept
well above 1e-3 (eps_float of the cases that perturb biases) and the parameters agree to 1e-5.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import qzo_fx
from tests.train import fsdp_worker

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "runs.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "tests.train.fsdp_worker", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


def _initial(name):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(fsdp_worker.Net(), fsdp_worker.CASES[name].config())
    if fsdp_worker.CASES[name].codes:
        qm = qzo_fx.to_integer_codes(qm)
    return {**{n: p.detach().clone() for n, p in qm.named_parameters()},
            **{n: b.clone() for n, b in qm.named_buffers() if n.endswith(".codes")}}


@pytest.mark.parametrize("name", list(fsdp_worker.CASES))
def test_two_ranks_match_one_process_on_the_whole_batch(sharded_runs, name):
    # The one process runs eagerly: a compiled case is also held to the eager estimate.
    sharded, alone, initial = sharded_runs[name], fsdp_worker.train(name, eager=True), _initial(name)
    wanted = "lean" if fsdp_worker.CASES[name].strategy == "lean" else "inplace"
    assert sharded["strategy"] == (None if name == "ste" else wanted)
    assert (sharded["compiled graphs"] > 0) == fsdp_worker.CASES[name].compile
    trained = list(initial)
    assert set(trained) <= set(sharded)
    for key in trained:
        torch.testing.assert_close(sharded[key], alone[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")
    # Training moved them (the agreement is not that of untouched tensors).
    moved = [k for k in trained if not torch.equal(initial[k], sharded[k])]
    assert moved and (name == "zoqo" or any(k.endswith("weight") for k in moved)), moved


@pytest.mark.parametrize("name, message", [
    ("bf16-params", "param_dtype"),
    ("uncalled-unit", "never calls"),
    ("graph-strategy", "cannot run on a model sharded with fully_shard"),
])
def test_unsupported_sharding_is_refused_by_name(sharded_runs, name, message):
    assert message in sharded_runs["refused"][name]
