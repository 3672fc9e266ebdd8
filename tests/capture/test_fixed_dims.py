"""A dimension torch.export fixed at capture is checked on every call, and stays fixed in the
exported file: a graph specialized to a size does not always fail at another one, and a
wrong-length output must not come back silently, from the model or from the file."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import qzo_fx
from tests.zoo.research_layers import TeacherForcedDecoder


def test_a_call_at_another_size_of_a_fixed_dimension_raises_instead_of_a_shorter_output():
    torch.manual_seed(0)
    model = TeacherForcedDecoder()
    tgt = torch.randint(0, 20, (2, 5))
    with pytest.warns(UserWarning, match=r"'tgt': 'dim 1 = 5'"):
        qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(tgt,))
    other_batch = torch.randint(0, 20, (3, 5))
    assert qm.eval()(other_batch).shape == model.eval()(other_batch).shape == (3, 5, 20)
    longer = torch.randint(0, 20, (2, 9))
    assert model(longer).shape == (2, 9, 20)  # the float model takes it ...
    with pytest.raises(qzo_fx.InputError, match=r"'tgt' with dimension 1 of size 5 only, and this call has 9"):
        qm(longer)  # ... the prepared one says it cannot, instead of returning 5 steps


def test_the_file_keeps_the_dimensions_the_prepared_graph_fixed(tmp_path):
    torch.manual_seed(0)
    tgt = torch.randint(0, 20, (2, 5))
    with pytest.warns(UserWarning):
        qm = qzo_fx.prepare(TeacherForcedDecoder(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8),
                            example_inputs=(tgt,))
    # The unrolled graph traces at any longer target, and would return 5 steps at every length.
    with pytest.warns(UserWarning, match=r"fixes 'tgt' axis 1 \(size 5\)"):
        result = qzo_fx.export_onnx(qm.eval(), (tgt,), tmp_path / "decoder.onnx")
    session = ort.InferenceSession(str(result.path))
    assert session.get_inputs()[0].shape == ["batch", 5]
    other_batch = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"tgt": other_batch.numpy()})[0], qm(other_batch).numpy(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="dimensions"):  # ORT refuses another length, as qm does
        session.run(None, {"tgt": torch.randint(0, 20, (2, 9)).numpy()})


class StepLoop(nn.Module):
    """A loop over a float sequence's steps, with the argument name torch.fx renames (``input``)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(8, 8)

    def forward(self, input):
        return torch.stack([self.cell(input[:, t]) for t in range(input.shape[1])], 1)


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_a_renamed_argument_is_checked_and_sizes_never_asked_to_vary_are_left_to_the_graph():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(StepLoop(), qzo_fx.QuantConfig(weight_bits=8), example_inputs=(torch.randn(2, 5, 8),),
                        capture="export")
    with pytest.raises(qzo_fx.InputError, match=r"'input' with dimension 1 of size 5 only"):
        qm(torch.randn(2, 7, 8))
    # A batch of 1 in the example and an image's height and width: torch.export fixes them without
    # being asked to, and the graph takes other sizes, as before.
    model = SmallConvNet().eval()
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(torch.randn(1, 3, 8, 8),),
                        capture="export")
    for shape in ((4, 3, 8, 8), (2, 3, 10, 12)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(qm.eval()(x), model(x))
