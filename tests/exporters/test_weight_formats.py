"""Weight formats: blocked and per-row low-bit weights as ORT's MatMulNBits / GatherBlockQuantized
or as standard Q/DQ, both right in the default session; dynamic batch and sequence."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import qzo_fx

pytestmark = pytest.mark.filterwarnings("ignore")


class TokenModel(nn.Module):
    """An embedding, a linear and a matmul with a Parameter: the three weight uses of an LLM."""

    def __init__(self, vocab: int = 96, dim: int = 64):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, dim), nn.Linear(dim, 128)
        self.proj = nn.Parameter(torch.randn(128, vocab) / 8)

    def forward(self, ids):
        return torch.relu(self.fc(self.emb(ids))) @ self.proj


def _spec(bits: int, symmetric: bool, group: int = 32):
    return qzo_fx.QuantSpec(bits=bits, granularity="per_group", group_size=group, symmetric=symmetric)


def _export(cfg, tmp_path, **kwargs):
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 7))
    qm = qzo_fx.prepare(TokenModel(), cfg, example_inputs=(ids,))
    return qm, qzo_fx.export_onnx(qm, (ids,), tmp_path / "m.onnx", **kwargs)


def _nodes(path, op_type):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


@pytest.mark.parametrize("bits,symmetric", [(2, True), (4, True), (4, False), (8, True), (8, False)])
def test_blocked_weights_as_matmulnbits_and_as_qdq_match_the_model(bits, symmetric, tmp_path):
    cfg = qzo_fx.QuantConfig(weight=_spec(bits, symmetric))
    probe = torch.randint(0, 96, (3, 11))  # another batch and sequence length than the example
    qm, nbits = _export(cfg, tmp_path / "nbits", weight_format="matmulnbits")
    assert nbits.op_types["MatMulNBits"] == 2 and "DequantizeLinear" not in nbits.op_types
    report = qzo_fx.verify_onnx(qm, nbits.path, (probe,))
    assert report.ok and report.outputs[0].steps < 0.01, str(report)
    _, qdq = _export(cfg, tmp_path / "qdq", weight_format="qdq")
    assert "MatMulNBits" not in qdq.op_types and "GatherBlockQuantized" not in qdq.op_types
    assert all(o.domain in ("", "ai.onnx") for o in onnx.load(str(qdq.path)).opset_import)
    assert qzo_fx.verify_onnx(qm, qdq.path, (probe,)).ok


def _dequantized_b(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The weight [N, K] a MatMulNBits node holds, read by ORT's documented layout (independent of
    the exporter's own packing code): low bits first, zero point 2**(bits-1) when absent."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    blob = inits[node.input[1]].reshape(n, -1).astype(np.int32)
    codes = np.stack([(blob >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)], -1).reshape(n, -1)[:, :k]
    zero = np.full((n, k // block), 2 ** (bits - 1))
    if len(node.input) > 3 and node.input[3]:
        packed = inits[node.input[3]].reshape(n, -1).astype(np.int32)
        zero = np.stack([(packed >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)], -1).reshape(n, -1)
        zero = zero[:, : k // block]
    scales = inits[node.input[2]].reshape(n, k // block)
    return (codes - np.repeat(zero, block, 1)) * np.repeat(scales, block, 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_layout_holds_the_trained_weights(symmetric, tmp_path):
    qm, result = _export(qzo_fx.QuantConfig(weight=_spec(4, symmetric)), tmp_path, weight_format="matmulnbits")
    file = onnx.load(str(result.path))
    inits = {i.name: numpy_helper.to_array(i) for i in file.graph.initializer}
    held = [_dequantized_b(n, inits) for n in file.graph.node if n.op_type == "MatMulNBits"]
    fc_q, proj_q = qm.qzo_quant.get_submodule("fc_weight"), qm.qzo_quant.get_submodule("proj")
    with torch.no_grad():
        fc = fc_q(qm.get_parameter("fc.weight")).numpy()
        proj = proj_q(qm.get_parameter("proj")).numpy().T  # x @ P: rows of B are P's columns
    np.testing.assert_allclose(sorted(held, key=lambda w: w.shape)[0 if fc.shape < proj.shape else 1], fc, atol=1e-7)
    np.testing.assert_allclose(next(w for w in held if w.shape == proj.shape), proj, atol=1e-7)


def test_auto_format_follows_the_target(tmp_path):
    cfg = qzo_fx.QuantConfig(weight=_spec(4, True))
    for target, contrib in (("cpu", True), ("cuda", True), ("tensorrt", False), ("portable", False)):
        _, result = _export(cfg, tmp_path / target, target=target)
        assert ("MatMulNBits" in result.op_types) == contrib, target
        assert ("GatherBlockQuantized" in result.op_types) == contrib, target
    with pytest.raises(qzo_fx.ExportError, match="weight_format"):
        _export(cfg, tmp_path, weight_format="int4")


@pytest.mark.parametrize("spec,gather", [(_spec(4, True), "GatherBlockQuantized"),
                                         (_spec(8, False), "GatherBlockQuantized"),
                                         (qzo_fx.QuantSpec(bits=8), "Gather")])
def test_quantized_embeddings_gather_codes_not_a_dequantized_table(spec, gather, tmp_path):
    qm, result = _export(qzo_fx.QuantConfig(weight=spec), tmp_path)
    file = onnx.load(str(result.path))
    producers = {o: n.op_type for n in file.graph.node for o in n.output}
    gathers = [n for n in file.graph.node if n.op_type == gather]
    assert gathers and all(producers.get(n.input[0]) != "DequantizeLinear" for n in gathers)
    # The table is stored as integers: no float initializer of the table's size.
    floats = [i for i in file.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert all(np.prod(i.dims) < 96 * 64 for i in floats)
    report = qzo_fx.verify_onnx(qm, result.path, (torch.randint(0, 96, (4, 5)),))
    assert report.ok and report.outputs[0].steps < 0.01, str(report)


def test_int8_per_row_linear_is_exact_as_matmulnbits(tmp_path):
    # ORT's optimizer turns DequantizeLinear(8-bit weight) -> MatMul into MatMulNBits with accuracy
    # level 4 (int8 activations) unless told otherwise, so for ORT targets the exporter writes the
    # MatMulNBits node itself, per-row scales repeated over blocks, at accuracy level 0 (fp32).
    cfg = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=8), overrides={"emb": {"weight": None}})
    qm, nbits = _export(cfg, tmp_path)
    assert nbits.op_types.get("MatMulNBits") == 2
    nodes = _nodes(nbits.path, "MatMulNBits")
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted((a["K"], a["block_size"], a["accuracy_level"]) for a in attrs) == [(64, 64, 0), (128, 128, 0)]
    report = qzo_fx.verify_onnx(qm, nbits.path, (torch.randint(0, 96, (3, 9)),))
    assert report.ok and report.outputs[0].steps < 0.01, str(report)


def test_batch_and_sequence_dynamic_by_default_static_on_request(tmp_path):
    qm, result = _export(qzo_fx.QuantConfig(weight=_spec(4, True)), tmp_path)
    assert result.dynamic_axes == {"ids": [0, 1]} and result.dynamic_batch
    dims = [d.dim_param for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    session = ort.InferenceSession(str(result.path))
    for shape in ((1, 3), (5, 17)):
        ids = torch.randint(0, 96, shape)
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {"ids": ids.numpy()})[0], qm.eval()(ids).numpy(), atol=1e-4)
    ids = torch.randint(0, 96, (2, 7))
    static = qzo_fx.export_onnx(qm, (ids,), tmp_path / "static.onnx", dynamic_shapes=False)
    assert static.dynamic_axes == {"ids": []} and not static.dynamic_batch
    batch_only = qzo_fx.export_onnx(qm, (ids,), tmp_path / "b.onnx", dynamic_shapes={"ids": {0: torch.export.Dim("n")}})
    assert batch_only.dynamic_axes == {"ids": [0]}
