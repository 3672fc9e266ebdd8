"""Example inputs given as one tensor, as torch.onnx.export takes them, mean one argument everywhere."""
from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import qzo_fx

pytestmark = pytest.mark.filterwarnings("ignore")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_one_tensor_is_one_input_from_prepare_to_the_runtime(tmp_path):
    x = torch.randn(2, 3, 8, 8)  # batch 2: tuple(x) would be two (3, 8, 8) arguments
    model = _model()
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=x)
    assert qzo_fx.examine(model, x) is not None
    qm.eval()
    path = qzo_fx.export_onnx(qm, x, tmp_path / "m.onnx").path
    session = ort.InferenceSession(str(path))
    assert len(session.get_inputs()) == 1
    probe = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = qm(probe).numpy()
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    assert np.abs(got - expected).max() <= np.abs(expected).max() / 127
    assert qzo_fx.verify_onnx(qm, path, probe).ok


class _Encoding(collections.UserDict):
    """A mapping that is not a dict, as a tokenizer's BatchEncoding is."""


@pytest.mark.parametrize("mapping", [dict, _Encoding], ids=["dict", "BatchEncoding-like"])
def test_a_mapping_of_example_inputs_names_example_kwargs(mapping):
    batch = mapping({"input": torch.randn(2, 3, 8, 8)})  # nn.Sequential.forward(input)
    with pytest.raises(qzo_fx.InputError, match="positional example inputs; pass keyword inputs as example_kwargs"):
        qzo_fx.prepare(_model(), qzo_fx.QuantConfig(), example_inputs=batch)
    qm = qzo_fx.prepare(_model(), qzo_fx.QuantConfig(activation_bits=8), example_kwargs=batch)  # the way it names
    assert qm(**batch).shape == _model()(**batch).shape


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x, mask):
        return self.lin(x) * mask


def test_keyword_inputs_alone_calibrate_and_export_asks_for_the_same_inputs(tmp_path):
    """model(**batch), as Hugging Face models are called: example_kwargs without example_inputs."""
    torch.manual_seed(0)
    batch = {"x": torch.randn(4, 6), "mask": torch.ones(4, 1)}
    qm = qzo_fx.prepare(_Masked(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_kwargs=batch)
    assert all(bool(q.initialized) for q in qm.qzo_quant.children())  # calibrated from the keywords
    with pytest.raises(qzo_fx.InputError, match=r"takes \(x, mask\).*'mask'"):
        qzo_fx.export_onnx(qm.eval(), None, tmp_path / "m.onnx", example_kwargs={"x": batch["x"]})
    path = qzo_fx.export_onnx(qm, None, tmp_path / "m.onnx", example_kwargs=batch).path
    assert qzo_fx.verify_onnx(qm, path, (), example_kwargs=batch).ok
