"""Integer-code weights, ZOQO and ZO-sign: grid invariants, determinism, training progress."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
import qzo_fx.train.noise
from qzo_fx.data import batches, load_digits
from qzo_fx.models import MLP
from qzo_fx.train.reference import zoqo, zoqo_noise


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _coded(bits=4, symmetric=True, sizes=(64, 32, 10), seed=0):
    torch.manual_seed(seed)
    qm = qzo_fx.prepare(MLP(sizes), qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=bits, symmetric=symmetric)))
    return qzo_fx.to_integer_codes(qm)


def test_switch_to_codes_and_back_is_exact_and_drops_latent_weights():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP((16, 8, 4)), qzo_fx.QuantConfig(weight_bits=3))
    x = torch.randn(5, 16)
    before = qm(x).detach()
    qzo_fx.to_integer_codes(qm)
    assert not any(name.endswith("weight") for name, _ in qm.named_parameters())
    assert qm.qzo_quant.get_submodule("1_weight").codes.dtype == torch.int16
    torch.testing.assert_close(qm(x), before, rtol=0, atol=0)
    qzo_fx.to_latent_weights(qm)
    torch.testing.assert_close(qm(x), before, rtol=0, atol=0)
    assert isinstance(qm.get_parameter("1.weight"), nn.Parameter)


def test_code_state_dict_round_trips_and_tied_weights_lose_every_alias():
    qm = _coded()
    other = _coded(seed=1)
    other.load_state_dict(qm.state_dict())
    x = torch.randn(3, 64)
    torch.testing.assert_close(other(x), qm(x))

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    tied = qzo_fx.to_integer_codes(qzo_fx.prepare(Tied(), qzo_fx.QuantConfig(weight_bits=4)))
    assert list(tied.named_parameters()) == []
    assert tied(torch.tensor([[1, 2]])).shape == (1, 2, 10)


def test_exported_code_model_equals_latent_export(tmp_path):
    torch.manual_seed(0)
    latent = qzo_fx.prepare(MLP((64, 32, 10)), qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, symmetric=True)))
    x = torch.randn(2, 64)
    expected = qzo_fx.export_onnx(latent, (x,), tmp_path / "latent.onnx", target="cpu")
    qm = qzo_fx.to_integer_codes(latent)
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "codes.onnx", target="cpu")
    assert result.op_types == expected.op_types  # the same lowering: codes are what latent weights round to
    assert qzo_fx.verify_onnx(qm, result.path, (torch.randn(4, 64),)).ok


@pytest.mark.parametrize("law", ["gaussian", "uniform"])
def test_zoqo_noise_is_integer_and_bounded(law):
    radius = torch.tensor([[1.0], [3.0]])
    j = zoqo_noise("torch", 12345, radius, torch.zeros(2, 5000, dtype=torch.int16), law)
    assert j.dtype == torch.int16
    assert j[0].abs().max() <= 1 and j[1].abs().max() <= 3 and j[1].abs().max() >= 2
    assert abs(float(j.float().mean())) < 0.1


def test_zoqo_reference_queries_clipped_codes_and_moves_on_the_grid():
    codes = torch.tensor([0, 7, -8, 3], dtype=torch.int16)
    seen = []

    def loss_at(values):
        seen.append(values[0].tolist())
        return torch.tensor(float(len(seen)))  # l+ = 1 < l- = 2: move along +sign(j)

    new = zoqo(loss_at, [codes], [torch.tensor(1.0)], [(-8, 7)], lr=2.0, mu=3.0, law="uniform", step_seed=4)
    j = zoqo_noise("auto", qzo_fx.train.noise.noise_key(4, 0, 0), torch.tensor(3.0), codes, "uniform")
    assert seen == [(codes + j).clamp(-8, 7).tolist(), (codes - j).clamp(-8, 7).tolist()]
    assert new[0].tolist() == (codes + 2 * torch.sign(j)).clamp(-8, 7).tolist()
    assert new[0].min() >= -8 and new[0].max() <= 7


@pytest.mark.parametrize("symmetric", [True, False])
def test_zoqo_codes_stay_in_range_and_values_on_grid(symmetric):
    qm = _coded(bits=2, symmetric=symmetric)
    data = load_digits()
    step = qzo_fx.train_step(qm, ce, qzo_fx.ZOQO(lr=1.0, mu=1.0, seed=3), strategy="inplace")
    for batch in batches(data.x_train, data.y_train, 64, epochs=2):
        step(batch)
    for name in ("1_weight", "3_weight"):
        quantizer = qm.qzo_quant.get_submodule(name)
        qmin, qmax = quantizer.spec.qrange
        assert quantizer.codes.min() >= qmin and quantizer.codes.max() <= qmax
        values = torch.ops.qzo.dequantize.default(quantizer.codes, quantizer.scale, quantizer.zero_point, 0, 0)
        grid = values / quantizer.scale[:, None] + quantizer.zero_point[:, None]
        torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-4)
    assert step.stats.backward_passes == 0 and step.stats.forward_passes == 2 * step.stats.steps


def test_zoqo_same_seed_same_codes_for_every_strategy():
    data = load_digits()
    codes = []
    for strategy in ("inplace", "sequential", "batched"):
        qm = _coded()
        step = qzo_fx.train_step(qm, ce, qzo_fx.ZOQO(seed=7), strategy=strategy)
        for batch in batches(data.x_train, data.y_train, 64, epochs=1):
            step(batch)
        codes.append(qm.qzo_quant.get_submodule("1_weight").codes.clone())
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])


def test_zoqo_reduces_training_loss_on_digits():
    data = load_digits()
    qm = _coded(bits=8)
    full = (data.x_train, data.y_train)
    with torch.no_grad():
        start = float(ce(qm, full))
    step = qzo_fx.train_step(qm, ce, qzo_fx.ZOQO(noise="uniform", seed=0), strategy="sequential")
    for batch in batches(data.x_train, data.y_train, 64, epochs=200):
        step(batch)
    with torch.no_grad():
        end = float(ce(qm, full))
    assert start > 2.2 and end < start - 0.25, (start, end)  # chance level is ln 10 = 2.30


def test_zoqo_needs_code_mode():
    qm = qzo_fx.prepare(MLP((8, 4)), qzo_fx.QuantConfig(weight_bits=4))
    with pytest.raises(qzo_fx.TrainStepError, match="to_integer_codes"):
        qzo_fx.train_step(qm, ce, qzo_fx.ZOQO())


@pytest.mark.parametrize("variant", ["elementwise", "scalar"])
def test_zo_sign_variants(variant):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MLP((8, 6, 3)), qzo_fx.QuantConfig(weight_bits=4))
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
    step = qzo_fx.train_step(qm, ce, qzo_fx.ZOSign(n=2, variant=variant, seed=0), strategy="sequential")
    step(batch)
    grad = qm.get_parameter("1.weight").grad
    c = torch.tensor(step.stats.last_branch_losses)
    if variant == "elementwise":
        assert set(grad.unique().tolist()) <= {-1.0, 0.0, 1.0}
    else:  # mean_i sign(c_i) u_i: a combination of the noise, not a sign vector
        assert len(grad.unique()) > 3 and bool((c[0::2] != c[1::2]).any())
    assert step.stats.backward_passes == 0


def test_one_bit_codes_stay_on_the_sign_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    qm = qzo_fx.to_integer_codes(qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=1), example_inputs=(x,)))
    step = qzo_fx.train_step(qm.train(), ce, qzo_fx.ZOQO(seed=0))
    before = {n: q.codes.clone() for n, q in qm.qzo_quant.named_children()}
    for _ in range(3):
        step((x, y))
    for name, q in qm.qzo_quant.named_children():
        assert set(q.codes.unique().tolist()) <= {-1, 1}, name
    assert any(not torch.equal(q.codes, before[n]) for n, q in qm.qzo_quant.named_children())  # codes moved
    with torch.no_grad():
        coded = qm.eval()(x)
        assert torch.equal(qzo_fx.to_latent_weights(qm).eval()(x), coded)


def test_zoqo_updates_batchnorm_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    qm = qzo_fx.to_integer_codes(qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(x,)))
    step = qzo_fx.train_step(qm.train(), ce, qzo_fx.ZOQO(seed=0))
    step((x, y))
    assert int(qm.get_buffer("1.num_batches_tracked")) == 1
