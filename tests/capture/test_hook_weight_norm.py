"""Models with the hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (TCN, WaveNet,
GAN discriminators): the weight the hook computed is a tensor autograd made, which
``copy.deepcopy`` refuses, and prepare, examine and export all work on copies."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qzo_fx
from tests.zoo.research_layers import TemporalConvNet

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_hook_weight_normalized_model_prepares_trains_and_exports(tmp_path):
    torch.manual_seed(0)
    model = TemporalConvNet().eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    float_qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(float_qm.eval()(x), expected)  # nothing quantized: exactly the float model
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    optimizer = torch.optim.Adam(qm.parameters(), lr=1e-3)
    qm.train()
    optimizer.zero_grad()
    qm(x).square().mean().backward()
    optimizer.step()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in qm.parameters())
    assert qm.get_parameter("net.0.weight_v").grad is not None  # the hook's parameters train
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model as it was
    qm.eval()
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "tcn.onnx")
    probe = torch.randn(3, 4, 16)
    session = ort.InferenceSession(str(result.path))
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, qm(probe).numpy(), rtol=1e-5, atol=1e-6)
    assert "computed by a forward hook" in str(qzo_fx.examine(model, (x,)))
