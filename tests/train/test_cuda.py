"""Training and export of a model that lives on a CUDA GPU (skipped where there is none).

The same estimators, strategies and branch semantics as on CPU. The noise is drawn on the GPU
(torch's Philox generator), so a GPU step is compared with the reference on the GPU, and with
the CPU step through the same torch streams only statistically; no host-to-device copy may run
inside a step (torch.profiler).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.models import MLP, SmallCNN
from qzo_fx.train.rng import RngState
from qzo_fx.train.strategies import AUTO_ROUNDS
from tests.train.test_train import DropNet, Runner, ce

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]

CUDA = torch.device("cuda")
STRATEGIES = ("inplace", "sequential", "batched", "lean")


def _images(n=32, device="cpu"):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_branches_replay_the_cuda_dropout_mask():
    # Dropout on a GPU draws from the CUDA generator: a branch with a zero perturbation must
    # reproduce the base loss exactly, which needs that generator replayed too.
    torch.manual_seed(0)
    qm = qzo_fx.prepare(DropNet(), qzo_fx.QuantConfig(weight_bits=2)).to(CUDA).train()
    batch = (torch.randn(64, 12, device=CUDA), torch.randint(0, 4, (64,), device=CUDA))
    zero = [([torch.zeros_like(qm.get_parameter("fc1.weight"))], s) for s in (1.0, -1.0)]
    rng = RngState.capture()
    with torch.no_grad():
        base = ce(qm, batch)
        for m in qm.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.zero_(), m.running_var.fill_(1), m.num_batches_tracked.zero_()
    for strategy in ("inplace", "sequential"):
        losses = Runner(qm, ce, ["fc1.weight"], strategy).losses(zero, batch, rng)
        torch.testing.assert_close(losses, torch.stack([base, base]), rtol=1e-5, atol=1e-6, msg=strategy)
    # vmap draws dropout with bernoulli_, CUDA's eager dropout with a fused kernel: batched
    # branches share one mask with each other, not with the base pass, and say so.
    with pytest.warns(RuntimeWarning, match="fused dropout"):
        losses = Runner(qm, ce, ["fc1.weight"], "batched").losses(zero, batch, rng)
    assert losses[0] == losses[1]


def test_one_sided_fogzo_refuses_batched_dropout_on_cuda_and_auto_avoids_it():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(DropNet(), qzo_fx.QuantConfig(weight_bits=2)).to(CUDA).train()
    batch = (torch.randn(64, 12, device=CUDA), torch.randint(0, 4, (64,), device=CUDA))
    one_sided = qzo_fx.FOGZO(total_steps=100, two_sided=False, seed=0)
    with pytest.raises(qzo_fx.TrainStepError, match="dropout masks"):
        qzo_fx.train_step(qm, ce, one_sided, strategy="batched")(batch)
    step = qzo_fx.train_step(qm, ce, one_sided, strategy="auto")
    for _ in range(8):
        qm.zero_grad(set_to_none=True)
        step(batch)
    assert "batched" not in step.strategy.timings and step.strategy.chosen in ("inplace", "sequential")


@pytest.mark.parametrize("factory", [MLP, SmallCNN])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fogzo_estimate_on_cuda_matches_the_cpu_step_in_direction(factory, strategy):
    torch.manual_seed(0)
    cpu = qzo_fx.prepare(factory(), qzo_fx.QuantConfig(weight_bits=2), example_inputs=(_images()[0],))
    gpu = copy.deepcopy(cpu).to(CUDA)
    grads = {}
    for name, model, device in (("cpu", cpu, "cpu"), ("cuda", gpu, CUDA)):
        # beta = 1: the direction is the STE gradient's, whatever noise each device draws.
        step = qzo_fx.train_step(model, ce, qzo_fx.FOGZO(beta_min=1.0, seed=3), strategy=strategy, noise="torch")
        model.zero_grad(set_to_none=True)
        loss = step(_images(device=device))
        assert torch.isfinite(loss) and step.stats.forward_passes == 3
        grads[name] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        assert all(p.grad.device.type == torch.device(device).type for p in model.parameters() if p.grad is not None)
    assert grads["cpu"].keys() == grads["cuda"].keys()
    for name in grads["cpu"]:
        # GEMM rounding differs between the devices and moves a few weights across a 2-bit
        # rounding boundary, hence a cosine, not equality.
        assert abs(_cosine(grads["cpu"][name], grads["cuda"][name])) > 0.99, name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_cuda_step_copies_nothing_from_the_host(strategy):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(SmallCNN(), qzo_fx.QuantConfig(weight_bits=2), example_inputs=(_images()[0],)).to(CUDA)
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(total_steps=100, seed=3), strategy=strategy,
                             on_nonfinite="unchecked")
    batch = _images(device=CUDA)
    for _ in range(2):
        qm.zero_grad(set_to_none=True)
        step(batch)  # warm: graphs built, buffers allocated
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        qm.zero_grad(set_to_none=True)
        step(batch)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name or "memcpy HtoD" in e.name.lower()]
    assert not copies, copies


@pytest.mark.parametrize("estimator", [qzo_fx.STE(), qzo_fx.FOGZO(total_steps=10, two_sided=False, seed=0),
                                       qzo_fx.NSPSA(n=4, seed=0), qzo_fx.ZOQO(seed=0)],
                         ids=["ste", "fogzo-1s", "nspsa", "zoqo"])
def test_every_estimator_trains_on_cuda(estimator):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP(), qzo_fx.QuantConfig(weight_bits=2))
    if isinstance(estimator, qzo_fx.ZOQO):
        qzo_fx.to_integer_codes(qm)  # ZOQO moves integer codes
    qm = qm.to(CUDA)
    step = qzo_fx.train_step(qm, ce, estimator, strategy="auto")
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    batch = _images(128, CUDA)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        losses.append(float(step(batch)))
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.device.type == "cuda" for p in qm.parameters())
    assert all(b.device.type == "cuda" for b in qm.buffers())
    if not isinstance(estimator, (qzo_fx.ZOQO, qzo_fx.NSPSA)):
        assert losses[-1] < losses[0]  # the same batch eight times: a gradient method must fit it


def test_auto_times_the_strategies_on_cuda():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(SmallCNN(), qzo_fx.QuantConfig(weight_bits=2)).to(CUDA)
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(total_steps=100, seed=0), strategy="auto")
    batch = _images(64, CUDA)
    for _ in range(3 * AUTO_ROUNDS + 1):
        qm.zero_grad(set_to_none=True)
        step(batch)
    assert step.strategy.chosen in ("inplace", "sequential", "batched")
    assert all(len(t) == AUTO_ROUNDS for t in step.strategy.timings.values())


def test_a_model_trained_on_cuda_exports_and_matches_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(SmallCNN(), qzo_fx.QuantConfig(weight_bits=4, activation_bits=8),
                        example_inputs=(_images(8)[0],)).to(CUDA)
    step = qzo_fx.train_step(qm, ce, qzo_fx.FOGZO(total_steps=10, seed=0))
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        step(_images(32, CUDA))
        opt.step()
    qm.eval()
    x = _images(4, CUDA)[0]
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", target="cpu")
    report = qzo_fx.verify_onnx(qm, result.path, (x,), target="cpu")
    assert report.ok, report
    assert all(p.device.type == "cuda" for p in qm.parameters())  # export leaves the user's model where it was


@pytest.mark.parametrize("weight", [qzo_fx.QuantSpec(bits=4), qzo_fx.QuantSpec(bits=4, ste="lsq"),
                                    qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=16)],
                         ids=["per-channel", "lsq", "per-group"])
def test_prepare_a_model_on_cuda_keeps_it_there_and_matches_cpu(weight):
    torch.manual_seed(0)
    model = SmallCNN()
    cfg = qzo_fx.QuantConfig(weight=weight, activation_bits=8, skip_first=True)  # 1 input channel: no groups
    x = _images(16)[0]
    cpu = qzo_fx.prepare(model, cfg, example_inputs=(x,))
    gpu = qzo_fx.prepare(copy.deepcopy(model).to(CUDA), cfg, example_inputs=(x.to(CUDA),))
    assert all(t.device.type == "cuda" for t in [*gpu.parameters(), *gpu.buffers()])
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        if name.endswith("scale"):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-7, msg=name)  # same calibration
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), cpu(x), rtol=1e-3, atol=1e-3)
    step = qzo_fx.train_step(gpu, ce, qzo_fx.STE())
    assert torch.isfinite(step(_images(16, CUDA)))
    coded = qzo_fx.to_integer_codes(gpu)
    assert all(t.device.type == "cuda" for t in coded.buffers())
