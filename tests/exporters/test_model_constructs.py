"""Constructs of users' models at export: a recurrent layer's sequence axis, an output torch.export
cannot flatten, a library's custom op (transformers' mixture-of-experts grouped matmul), and an
aten op torch.onnx has no rule for (``torch.cdist``)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from tests.zoo.onnx_check import file_info, reference_evaluator
from tests.zoo.research_layers import CodebookLookup

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
    assert qm(torch.randint(0, 30, (2, 10))).shape == (2, 10, 5)  # the prepared model takes any length
    with pytest.warns(UserWarning, match=r"fixes 'idx' axis 1 \(size 7\)"):  # the file does not: export says so
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


class TimeMajor(nn.Module):
    """PyTorch's default RNN layout: (sequence, batch, features), the batch on axis 1."""

    def __init__(self):
        super().__init__()
        self.gru, self.out = nn.GRU(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.gru(x)[0][-1])


def test_a_time_major_rnn_exports_with_its_batch_dynamic(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 2, 8)
    qm = qzo_fx.prepare(TimeMajor(), W8A8, example_inputs=(x,))
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    assert 1 in result.dynamic_axes["x"]
    session = ort.InferenceSession(str(result.path))
    probe = torch.randn(6, 5, 8)  # another batch
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": probe.numpy()})[0], qm.eval()(probe).numpy(), atol=1e-5)


class Box:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class ReturnsAnObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x), Box(2 * x)


def test_an_output_torch_export_cannot_flatten_is_named_with_the_way_out(tmp_path):
    x = torch.randn(2, 4)
    qm = qzo_fx.prepare(ReturnsAnObject(), qzo_fx.QuantConfig(weight_bits=8), example_inputs=(x,))
    with pytest.raises(qzo_fx.ExportError) as info:
        qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    first = str(info.value).splitlines()[0]
    assert "its output holds a " in first and "Box" in first and "register_pytree_node" in first
    assert "use_cache=False" in first and not (tmp_path / "m.onnx").exists()


class Experts(nn.Module):
    """Rows sorted by expert through transformers' grouped matmul (Mixtral's experts on CPU)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8, 6) / 3)  # 3 experts, 8 -> 6
        self.head = nn.Linear(6, 4)

    def forward(self, x, ends):
        return self.head(torch.ops.transformers.grouped_mm_fallback(x, self.weight, ends))


def test_transformers_grouped_mm_exports_and_matches_for_any_routing(tmp_path):
    pytest.importorskip("transformers")
    from tests.zoo.models import torchvision_shim

    torchvision_shim()
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    torch.manual_seed(0)
    x, ends = torch.randn(6, 8), torch.tensor([2, 4, 6])
    qm = qzo_fx.prepare(Experts(), qzo_fx.QuantConfig(weight_bits=8), example_inputs=(x, ends))
    result = qzo_fx.export_onnx(qm, (x, ends), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(result.path))
    names = [i.name for i in session.get_inputs()]
    # Even routing, an expert with no rows, every row to the last expert, rows past the last end (0).
    for rows, routed in ((6, [2, 4, 6]), (9, [3, 3, 9]), (5, [0, 0, 5]), (7, [1, 3, 4])):
        probe, probe_ends = torch.randn(rows, 8), torch.tensor(routed)
        with torch.no_grad():
            expected = qm.eval()(probe, probe_ends).numpy()
        got = session.run(None, dict(zip(names, (probe.numpy(), probe_ends.numpy()))))[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=str(routed))


class MaskUnitAttention(nn.Module):
    """Attention within windows, as Hiera's mask units: [batch, heads, windows, tokens, dim]."""

    def __init__(self, dim: int = 16, heads: int = 2, windows: int = 4):
        super().__init__()
        self.heads, self.windows = heads, windows
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, -1, self.windows, 3, self.heads, c // self.heads).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 3).reshape(b, t, c))


def test_five_dimensional_attention_exports_and_matches(tmp_path):
    torch.manual_seed(0)
    x, mask = torch.randn(2, 8, 16), torch.rand(2, 8 // 4) > 0.3  # tokens per window: 2
    qm = qzo_fx.prepare(MaskUnitAttention(), W8A8, example_inputs=(x, mask))
    result = qzo_fx.export_onnx(qm.eval(), (x, mask), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(result.path))
    probe, probe_mask = torch.randn(3, 8, 16), torch.rand(2, 2) > 0.3
    probe_mask[:, 0] = True  # every query attends somewhere
    with torch.no_grad():
        expected = qm(probe, probe_mask).numpy()
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], (probe.numpy(), probe_mask.numpy()))))
    assert np.abs(got[0] - expected).max() <= np.abs(expected).max() / 127
    assert qzo_fx.verify_onnx(qm, result.path, (probe, probe_mask)).ok


@pytest.mark.parametrize("p", [2.0, 1.0, 0.0, float("inf"), 3.0])
def test_cdist_exports_and_matches_the_model_and_the_onnx_reference(tmp_path, p):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(CodebookLookup(p), W8A8, example_inputs=(torch.randn(2, 5, 8),))
    result = qzo_fx.export_onnx(qm, (torch.randn(2, 5, 8),), tmp_path / "m.onnx")
    x = torch.randn(3, 7, 8)  # another batch and length: the distances are not fixed to the example's
    with torch.no_grad():
        expected = [t.numpy() for t in qm.eval()(x)]
    session = ort.InferenceSession(str(result.path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    spec = reference_evaluator(str(result.path), file_info(str(result.path)))
    reference = spec.run(None, {session.get_inputs()[0].name: x.numpy()})
    for ours, runtime, spec in zip(expected, got, reference):
        np.testing.assert_allclose(runtime, ours, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(spec, ours, rtol=1e-5, atol=1e-5)


class MultiScaleHead(nn.Module):
    """A list argument (an FPN's features) and a dict argument (a batch as a dataset yields it)."""

    def __init__(self):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, 8, 1) for c in (4, 8))
        self.side, self.out = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, features, batch):
        pooled = sum(F.adaptive_avg_pool2d(conv(f), 1).flatten(1) for conv, f in zip(self.lateral, features))
        return self.out(pooled * torch.sigmoid(self.side(batch["meta"])) + batch["bias"])


def _multi_scale_inputs(batch: int):
    return ([torch.randn(batch, 4, 8, 8), torch.randn(batch, 8, 4, 4)],
            {"meta": torch.randn(batch, 3), "bias": torch.randn(batch, 1)})


def test_list_and_dict_arguments_export_with_their_batch_dynamic_and_verify(tmp_path):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(MultiScaleHead(), W8A8, example_inputs=_multi_scale_inputs(2))
    result = qzo_fx.export_onnx(qm.eval(), _multi_scale_inputs(2), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(result.path))
    assert [i.name for i in session.get_inputs()] == ["features_0", "features_1", "batch_meta", "batch_bias"]
    features, batch = _multi_scale_inputs(3)  # another batch size than the example's
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()],
                                     [t.numpy() for t in (*features, batch["meta"], batch["bias"])])))[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, qm(features, batch).numpy(), rtol=1e-5, atol=1e-5)
    assert qzo_fx.verify_onnx(qm, result.path, (features, batch)).ok


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, left, right):
        return self.a(left) - self.b(right)


def test_verify_feeds_keyword_inputs_in_the_forward_order_whatever_order_they_are_given_in(tmp_path):
    torch.manual_seed(0)
    inputs = {"left": torch.randn(2, 4), "right": torch.randn(2, 6)}
    qm = qzo_fx.prepare(TwoInputs(), W8A8, example_kwargs=inputs)
    result = qzo_fx.export_onnx(qm.eval(), (), tmp_path / "m.onnx", example_kwargs=inputs)
    reordered = {"right": torch.randn(3, 6), "left": torch.randn(3, 4)}
    assert qzo_fx.verify_onnx(qm, result.path, (), kwargs=reordered).ok
