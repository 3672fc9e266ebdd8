"""Scales on a short binary grid (QuantConfig.exact_scales): the grid itself against plain math,
calibration's choice between the two neighbours, how a config resolves it, and what it is for: a
random-init CNN's file gives the model's outputs in ONNX Runtime's default session and in the spec's
reference evaluator, with no rounding tie between float and integer kernels."""
from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

import qzo_fx
from qzo_fx import QuantConfig, QuantSpec
from qzo_fx.errors import ConfigError
from qzo_fx.quant.calibration import init_scale
from qzo_fx.quant.scale_grid import grid_ceil, grid_floor
from tests.zoo.onnx_check import file_info, reference_evaluator

W8A8 = QuantConfig(weight_bits=8, activation_bits=8)


def _plain_grid(value: float, bits: int, up: bool) -> float:
    m, e = math.frexp(value)
    units = m * 2 ** bits
    return math.ldexp(math.ceil(units) if up else math.floor(units), e - bits)


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_grid_neighbours_are_the_plain_math(bits):
    values = torch.cat([torch.rand(200) * 10.0 ** torch.randint(-8, 3, (200,)).float(),
                        torch.tensor([1.0, 0.5, 0.75, 3.0])])
    below, above = grid_floor(values, bits), grid_ceil(values, bits)
    assert below.tolist() == [_plain_grid(v, bits, False) for v in values.tolist()]
    assert above.tolist() == [_plain_grid(v, bits, True) for v in values.tolist()]
    assert (below <= values).all() and (above >= values).all() and (above <= 2 * below).all()


def _plain_error(t: np.ndarray, scale: float, zero: float, qmin: int, qmax: int) -> float:
    fake = (np.clip(np.round(t / scale) + zero, qmin, qmax) - zero) * scale
    return float(((fake - t).astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("symmetric", [True, False])
def test_calibration_takes_the_grid_neighbour_with_the_smaller_error(symmetric):
    torch.manual_seed(1)
    for trial in range(20):
        x = torch.randn(4000) * (0.1 + trial) + (0.0 if symmetric else 0.3 * trial)
        spec = QuantSpec(bits=8, granularity="per_tensor", symmetric=symmetric, scale_bits=1)
        scale, zero = init_scale(x, spec)
        free, _ = init_scale(x, spec.replace(scale_bits=0))
        qmin, qmax = spec.qrange
        t = x.numpy()
        candidates = [_plain_grid(float(free), 1, up) for up in (False, True)]
        low = min(0.0, float(t.min()))
        zeros = [0.0 if symmetric else float(np.clip(qmin - np.round(low / c), qmin, qmax)) for c in candidates]
        zeros = [z - z % 2 for z in zeros]  # even zero points on a grid
        errors = [_plain_error(t, c, z, qmin, qmax) for c, z in zip(candidates, zeros)]
        best = int(np.argmin(errors)) if errors[0] != errors[1] else 1
        assert float(scale) == candidates[best] and float(zero) == zeros[best]


def test_a_config_puts_integer_kernel_scales_on_the_grid_and_leaves_the_rest():
    weight, activation = W8A8.resolve("fc", None)
    assert (weight.scale_bits, activation.scale_bits) == (4, 1)
    off = QuantConfig(weight_bits=8, activation_bits=8, exact_scales=False).resolve("fc", None)
    assert (off[0].scale_bits, off[1].scale_bits) == (0, 0)
    # No integer kernel without quantized activations; learned scales move off any grid.
    assert QuantConfig(weight_bits=8).resolve("fc", None)[0].scale_bits == 0
    learned = QuantConfig(weight=QuantSpec(ste="lsq"), activation_bits=8).resolve("fc", None)
    assert learned[0].scale_bits == 0 and learned[1].scale_bits == 1
    explicit = QuantConfig(weight=QuantSpec(scale_bits=2), activation_bits=8, exact_scales=False).resolve("fc", None)
    assert explicit[0].scale_bits == 2
    with pytest.raises(ConfigError, match="scale_bits"):
        QuantSpec(bits=1, scale_bits=1)
    with pytest.raises(ConfigError, match="scale_bits"):
        QuantSpec(scale_bits=30)


def test_average_pools_of_codes_round_their_exact_halves_as_the_runtime(tmp_path):
    # A 2x2 average of grid codes often lands exactly on a half; ORT's QLinearAveragePool rounds
    # it to even on q + z, torch on q: even zero points make the two agree.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.AvgPool2d(2), torch.nn.Conv2d(32, 8, 1))
    x = torch.randn(4, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,)).eval()
    zeros = [float(q.zero_point) for q in qm.qzo_quant.children() if q.role == "activation"]
    assert all(z % 2 == 0 for z in zeros) and any(z > 0 for z in zeros)
    path = str(qzo_fx.export_onnx(qm, x, tmp_path / "pool.onnx").path)
    session = ort.InferenceSession(path)
    with torch.no_grad():
        expected = qm(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max() / 127


def test_prepared_scales_are_on_the_grid():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(torch.randn(4, 3, 8, 8),))
    for name, q in qm.qzo_quant.named_children():
        bits = 1 if q.role == "activation" else 4
        assert torch.equal(grid_floor(q.scale.detach(), bits), q.scale.detach()), name


def test_random_init_resnet_file_gives_the_model_outputs_in_both_runtimes(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    optimizer = torch.optim.Adam(qm.parameters(), lr=1e-3)
    for batch in (x, torch.randn(3, 3, 64, 64)):  # a smaller last batch, as a DataLoader gives
        qm.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(qm(batch), torch.arange(len(batch)) % 10).backward()
        optimizer.step()
    qm.eval()
    path = qzo_fx.export_onnx(qm, x, tmp_path / "resnet18.onnx").path
    session, reference = ort.InferenceSession(str(path)), reference_evaluator(str(path), file_info(str(path)))
    name = session.get_inputs()[0].name
    for inputs in (x, torch.randn(3, 3, 64, 64)):
        with torch.no_grad():
            expected = qm(inputs).numpy()
        step = np.abs(expected).max() / 127
        # Float-sum noise only (the float output's last bits): no code anywhere took a neighbour.
        assert np.abs(session.run(None, {name: inputs.numpy()})[0] - expected).max() < 1e-3 * step
        assert np.abs(reference.run(None, {name: inputs.numpy()})[0] - expected).max() < 1e-3 * step
