"""The int32 bias of a zero-initialised layer: its weight scale is raised until the bias codes fit,
instead of the bias being clipped to a few percent of itself (a spatial transformer's
localisation head, whose bias is the identity transform)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qzo_fx
from qzo_fx.passes.prepare.quantize_bias import BIAS_HEADROOM
from tests.zoo.research_layers import SpatialTransformer

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_zero_initialised_layer_keeps_its_bias_in_training_and_in_the_file(tmp_path):
    torch.manual_seed(0)
    model, x = SpatialTransformer(), torch.randn(2, 1, 16, 16)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    weight_q = {q.target: q for q in qzo_fx.list_quantizers(qm)}
    assert "theta.weight" in weight_q
    for training in (True, False):
        qm.train(training)
        with torch.no_grad():
            theta = qm(x)[1]
        # The weight is zero, so theta is the bias as the int32 grid holds it: the identity.
        torch.testing.assert_close(theta, model.theta.bias.expand(2, 6).view(2, 2, 3), atol=1e-4, rtol=0)
    scale = qm.get_submodule("qzo_quant.theta_weight").scale
    input_scale = qm.get_submodule("qzo_quant.theta_input").scale
    assert float((model.theta.bias.abs() / (input_scale * scale)).max()) <= BIAS_HEADROOM
    assert float(scale[2]) == pytest.approx(1e-8, rel=0.1)  # a zero bias leaves the floor as it was
    qm.eval()
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "stn.onnx")
    session = ort.InferenceSession(str(result.path))
    probe = torch.randn(3, 1, 16, 16)
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})
    with torch.no_grad():
        expected = [t.numpy() for t in qm(probe)]
    for ours, runtime in zip(expected, got):
        np.testing.assert_allclose(runtime, ours, atol=1e-5, rtol=1e-5)
