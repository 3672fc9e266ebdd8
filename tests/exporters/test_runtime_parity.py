"""W8A8 files are right in ONNX Runtime's default session, judged against the ONNX reference
evaluator (the spec) and the eval-mode model: 7-bit weights for ORT CPU, int32 biases as trained."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qzo_fx
from qzo_fx.capture.modes import mode_graph

pytestmark = pytest.mark.filterwarnings("ignore")
W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


def _vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _session(model: onnx.ModelProto, level=None):
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _dq_gemm(low: int, high: int, transpose_matmul: bool) -> onnx.ModelProto:
    """uint8 activation Q/DQ -> DequantizeLinear(per-channel int8 weight) -> Gemm(transB) or
    Transpose -> MatMul -> output Q/DQ: what ORT fuses to QGemm / QLinearMatMul."""
    rng = np.random.default_rng(0)
    n, k = 32, 256
    weight = np.where(rng.random((n, k)) < 0.5, low, high).astype(np.int8)  # extreme codes: worst sums
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(np.float32(1.0), "xs"),
             numpy_helper.from_array(np.uint8(0), "xz"), numpy_helper.from_array(np.float32(8.0), "ys"),
             numpy_helper.from_array(np.uint8(128), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0)]
    if transpose_matmul:
        nodes += [helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["xd", "wt"], ["y"])]
    else:
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=1))
    nodes += [helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    graph = helper.make_graph(nodes, "dq_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("transpose_matmul", [False, True], ids=["gemm", "transpose-matmul"])
def test_int8_kernels_are_exact_with_7_bit_weights(transpose_matmul):
    # Activations at the top of the uint8 range beside the largest weights: the sums of pairs of
    # u8 x s8 products that saturate int16 in MLAS's U8S8 kernels on AVX2 CPUs without VNNI.
    x = np.full((4, 256), 255.0, np.float32) * np.random.default_rng(1).choice([1.0, 0.99], (4, 256)).astype(np.float32)
    reduced, full = _dq_gemm(-64, 63, transpose_matmul), _dq_gemm(-128, 127, transpose_matmul)
    for model in (reduced, full):  # the ORT session without fusions computes the spec exactly
        spec = ReferenceEvaluator(model).run(None, {"x": x})[0]
        basic = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC).run(None, {"x": x})[0]
        np.testing.assert_array_equal(basic, spec)
    spec = ReferenceEvaluator(reduced).run(None, {"x": x})[0]
    np.testing.assert_array_equal(_session(reduced).run(None, {"x": x})[0], spec)  # default session: exact
    fused = _session(full).run(None, {"x": x})[0]
    spec_full = ReferenceEvaluator(full).run(None, {"x": x})[0]
    if platform.machine() in ("x86_64", "AMD64") and not _vnni():
        # Measured on AMD EPYC (AVX2): 29% off at the default level, exact at ORT_ENABLE_BASIC.
        assert np.abs(fused - spec_full).max() > 0.05 * np.abs(spec_full).max()


def test_default_w8a8_config_trains_and_exports_7_bit_weights(tmp_path):
    x = torch.randn(4, 16)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    assert {q.name: (q.bits, q.qrange) for q in _quantizers(qm) if q.role == "weight"} == {
        "0_weight": (8, (-64, 63)), "2_weight": (8, (-64, 63))}
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    file = onnx.load(str(result.path))
    codes = [numpy_helper.to_array(i) for i in file.graph.initializer if i.data_type == TensorProto.INT8]
    assert codes and all(c.min() >= -64 and c.max() <= 63 for c in codes)
    assert qzo_fx.verify_onnx(qm, result.path, (torch.randn(7, 16),)).ok


def _quantizers(qm):
    class Row:
        def __init__(self, name, q):
            self.name, self.role, self.bits, self.qrange = name, q.role, q.spec.bits, q.spec.qrange
    return [Row(name, q) for name, q in qm.qzo_quant.named_children()]


def test_full_range_int8_weights_are_refused_for_ort_cpu_and_allowed_for_tensorrt(tmp_path):
    x = torch.randn(4, 16)
    cfg = qzo_fx.QuantConfig(weight_bits=8, activation=qzo_fx.QuantSpec(granularity="per_tensor"), target="tensorrt")
    qm = qzo_fx.prepare(nn.Sequential(nn.Linear(16, 8)), cfg, example_inputs=(x,))
    assert qm.qzo_quant.get_submodule("0_weight").spec.qrange == (-128, 127)
    for target in ("cpu", "auto", "portable"):
        with pytest.raises(qzo_fx.ExportError, match=r"full int8 range.*int16.*QuantConfig\(target="):
            qzo_fx.export_onnx(qm, (x,), tmp_path / "cpu.onnx", target=target)
    assert not (tmp_path / "cpu.onnx").exists()
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "trt.onnx", target="tensorrt")
    assert result.path.exists()
    # Weight-only 8-bit weights run in float on ORT CPU: the full range is right there.
    weight_only = qzo_fx.prepare(nn.Sequential(nn.Linear(16, 8)), qzo_fx.QuantConfig(weight_bits=8))
    assert weight_only.qzo_quant.get_submodule("0_weight").spec.qrange == (-128, 127)
    qzo_fx.export_onnx(weight_only, (x,), tmp_path / "w8.onnx", target="cpu")


def test_bias_rounded_at_input_times_weight_step_in_training_and_in_the_file(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(8, 16)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Conv1d(1, 3, 3, padding=1))
    cfg = qzo_fx.QuantConfig(weight_bits=4, activation=qzo_fx.QuantSpec(bits=4, granularity="per_tensor",
                                                                      symmetric=False))
    qm = qzo_fx.prepare(nn.Sequential(model[0], model[1], nn.Unflatten(1, (1, 8)), model[2]), cfg, example_inputs=(x,))
    bias_fqs = [n for n in mode_graph(qm, False).nodes if n.target is torch.ops.qzo.fake_quant.default
                and n.args[3] < -2**30]
    assert len(bias_fqs) == 2
    # Gradients still reach the bias (identity STE) and the step is s_x * s_w per output channel.
    qm.train()
    qm(x).sum().backward()
    assert qm.get_parameter("0.bias").grad is not None and qm.get_parameter("0.bias").grad.abs().sum() > 0
    s = (qm.qzo_quant.get_submodule("0_input").scale * qm.qzo_quant.get_submodule("0_weight").scale).detach()
    trained = torch.ops.qzo.fake_quant(qm.get_parameter("0.bias").detach(), s, torch.zeros_like(s),
                                       -2**31 + 128, 2**31 - 128, 0, 0, "identity")
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", target="cpu")
    file = onnx.load(str(result.path))
    int32 = {i.name: numpy_helper.to_array(i) for i in file.graph.initializer if i.data_type == TensorProto.INT32
             and i.name.endswith("codes")}
    assert len(int32) == 2
    first = next(v for v in int32.values() if v.shape == (8,))
    np.testing.assert_array_equal(first.astype(np.float32) * s.numpy(), trained.numpy())
    report = qzo_fx.verify_onnx(qm, result.path, (torch.rand(5, 16),))
    assert report.ok and report.outputs[0].steps < 0.01, str(report)


def _at_opset_21(model: onnx.ModelProto) -> onnx.ModelProto:
    """The reference evaluator implements DequantizeLinear from opset 19 on; int8 Q/DQ mean the
    same from opset 13 to 21, so an opset-18 file is evaluated after the standard conversion."""
    return model if model.opset_import[0].version >= 19 else onnx.version_converter.convert_version(model, 21)


# ------------------------------------------------------------------ models from issue reports
class TiedEmbeddingHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(50, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


class RawParameters(nn.Module):
    """F.linear on raw Parameters and a matmul with a Parameter."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(64, 32) / 4), nn.Parameter(torch.randn(64) / 4)
        self.w2 = nn.Parameter(torch.randn(64, 16) / 8)

    def forward(self, x):
        return torch.relu(F.linear(x, self.w1, self.b1)) @ self.w2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


class SharedLinear(nn.Module):
    """One Linear called three times."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for _ in range(3):
            h = torch.relu(self.shared(h)) + h
        return self.out(h)


HAND = {
    "tied-embedding-head": (TiedEmbeddingHead, lambda: torch.randint(0, 50, (4, 12))),
    "raw-parameters": (RawParameters, lambda: torch.randn(8, 32)),
    "multihead-attention": (Attention, lambda: torch.randn(4, 10, 32)),
    "linear-called-three-times": (SharedLinear, lambda: torch.randn(8, 16)),
}


@pytest.mark.parametrize("name", list(HAND))
def test_w8a8_models_right_in_the_spec_and_the_default_session(name, tmp_path):
    torch.manual_seed(0)
    factory, data = HAND[name]
    x = data()
    qm = qzo_fx.prepare(factory().eval(), W8A8, example_inputs=(x,))
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    probe = data()  # another batch than the example
    with torch.no_grad():
        expected = qm.eval()(probe).numpy()
    file = onnx.load(str(result.path))
    spec = ReferenceEvaluator(_at_opset_21(file)).run(None, {file.graph.input[0].name: probe.numpy()})[0]
    step = np.abs(expected).max() / 127
    assert np.abs(spec - expected).max() <= step  # the file is the model (the spec's own float order)
    report = qzo_fx.verify_onnx(qm, result.path, (probe,))
    assert report.ok and report.outputs[0].steps <= 0.01, str(report)
