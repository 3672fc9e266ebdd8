"""Constructs of users' models at export: a recurrent layer's sequence axis."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import qzo_fx

pytestmark = pytest.mark.filterwarnings("ignore")
W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.out = nn.Embedding(30, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 5)

    def forward(self, idx):
        return self.out(self.lstm(self.emb(idx))[0])


def test_lstm_sequence_axis_is_declared_as_the_length_the_file_runs(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 7))
    qm = qzo_fx.prepare(Tagger(), W8A8, example_inputs=(ids,))
    result = qzo_fx.export_onnx(qm, (ids,), tmp_path / "m.onnx")
    # torch.export fixes an LSTM's sequence length; the file says so instead of naming a symbol "7".
    assert result.dynamic_axes == {"idx": [0]}
    file = onnx.load(str(result.path))
    declared = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(file.graph.input) + list(file.graph.output)]
    assert declared == [["batch", 7], ["batch", 7, 5]]
    session = ort.InferenceSession(str(result.path))
    probe = torch.randint(0, 30, (5, 7))  # any batch runs
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"idx": probe.numpy()})[0], qm.eval()(probe).numpy(),
                                   atol=1e-5)
    assert qzo_fx.verify_onnx(qm, result.path, (probe,)).ok
    # Another length is refused at the input, where the user can see why, not inside a Reshape.
    with pytest.raises(Exception, match="idx"):
        session.run(None, {"idx": torch.randint(0, 30, (2, 10)).numpy()})

