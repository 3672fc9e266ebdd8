"""ONNX export: spec-clean files, exact op-type lists, int4 storage, parity with ONNX Runtime."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import qzo_fx
from qzo_fx.exporters.lower import lower_for_export
from qzo_fx.models import MLP, SmallCNN, TinyLlama, TinyViT
from tests.zoo.research import DataDependent  # traceable by torch.fx, not exportable

pytestmark = pytest.mark.filterwarnings("ignore")


_DATA = torch.Generator().manual_seed(1234)  # fixed inputs whatever ran before this module
IMAGES = torch.randn(4, 1, 28, 28, generator=_DATA)
TOKENS = torch.randint(0, 128, (2, 16), generator=_DATA)
W4 = qzo_fx.QuantConfig(weight_bits=4)
W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


def _export(model, x, cfg, tmp_path, **kwargs):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(model, cfg, example_inputs=(x,))
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", target="cpu", **kwargs)
    return qm, result, onnx.load(str(result.path))


# Weight-only files run in float in ORT: equal up to float rounding. W8A8 files run fused integer
# kernels in ORT's default session (QGemm/QLinearConv, int32 biases as trained): after following
# rounding ties, equal up to float rounding too. DequantizeLinear: weights, int32 biases (the CNN's
# three folded from BatchNorm), activations.
@pytest.mark.parametrize("name,factory,x,cfg,ops,bound", [
    ("mlp-w4", MLP, IMAGES, W4, {"MatMulNBits": 2, "Add": 2, "Relu": 1, "Reshape": 1}, 0.01),
    ("mlp-w8a8", MLP, IMAGES, W8A8, {"DequantizeLinear": 6, "QuantizeLinear": 2, "Gemm": 2, "Relu": 1,
                                     "Reshape": 1}, 0.01),
    ("cnn-bn-w8a8", SmallCNN, IMAGES, W8A8, {"Conv": 3, "DequantizeLinear": 13, "QuantizeLinear": 5, "Gemm": 1,
                                             "ReduceMean": 1, "Relu": 3}, 0.01),
])
def test_op_types_and_parity(name, factory, x, cfg, ops, bound, tmp_path):
    qm, result, model = _export(factory(), x, cfg, tmp_path)
    assert result.op_types == ops  # BatchNorm folded: no BatchNormalization node
    onnx.checker.check_model(model, full_check=True)
    report = qzo_fx.verify_onnx(qm, result.path, (torch.randn(7, *x.shape[1:]),))
    assert report.ok and report.outputs[0].steps < bound, str(report)


# 10 weight DequantizeLinear each, one per int32 bias of an op with quantized input and weight, plus
# one Q/DQ pair per quantized activation (ViT: the inputs of the patch conv, of the 8 block linears,
# of the mean pool and of the head).
VIT_OPS = {"Add": 13, "Concat": 4, "Conv": 1, "DequantizeLinear": 31, "Gather": 6, "Gelu": 2, "Gemm": 1,
           "LayerNormalization": 5, "MatMul": 12, "Mul": 4, "QuantizeLinear": 11, "ReduceMean": 1, "Reshape": 9,
           "Shape": 2, "Slice": 6, "Softmax": 2, "Transpose": 15}
# Dynamic batch and sequence: the causal mask is built from the input's shape (Shape, Trilu, Where).
# The embedding gathers its int8 rows and dequantizes only those (Gather x3, Cast, Sub, Mul, Reshape).
LLAMA_OPS = {"Add": 18, "Cast": 2, "Concat": 9, "DequantizeLinear": 27, "Div": 2, "Equal": 2, "Erf": 2, "Expand": 2,
             "Gather": 3, "LayerNormalization": 5, "MatMul": 13, "Mul": 9, "QuantizeLinear": 9, "Reshape": 10,
             "Shape": 8, "Slice": 15, "Softmax": 2, "Squeeze": 6, "Sub": 1, "Transpose": 15, "Trilu": 2,
             "Unsqueeze": 2, "Where": 2}


def test_tiny_vit_op_types_and_parity(tmp_path):
    qm, result, _ = _export(TinyViT(), IMAGES, qzo_fx.QuantConfig(weight_bits=4, activation_bits=8), tmp_path)
    assert result.op_types == VIT_OPS
    assert qzo_fx.verify_onnx(qm, result.path, (torch.randn(5, 1, 28, 28),)).ok


def test_tiny_llama_captured_with_torch_export_op_types_and_parity(tmp_path):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(TinyLlama(), W8A8, example_inputs=(TOKENS,), capture="export")
    assert qm.meta["qzo.capture"].method == "export"
    result = qzo_fx.export_onnx(qm, (TOKENS,), tmp_path / "llama.onnx", target="cpu")
    assert result.op_types == LLAMA_OPS
    assert qzo_fx.verify_onnx(qm, result.path, (torch.randint(0, 128, (2, 16)),)).ok


def test_int4_weights_are_true_int4_and_small(tmp_path):
    qm, result, model = _export(MLP(), IMAGES, W4, tmp_path, weight_format="qdq")
    kinds = {init.name: init.data_type for init in model.graph.initializer}
    assert sorted(t for n, t in kinds.items() if n.endswith("codes")) == [onnx.TensorProto.INT4] * 2
    assert result.opset == 21
    fp32_bytes = sum(p.numel() * 4 for p in MLP().parameters())
    assert result.size_bytes < 0.16 * fp32_bytes


def test_blocked_int4_layout(tmp_path):
    cfg = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=16))
    qm, result, model = _export(MLP(), IMAGES, cfg, tmp_path, weight_format="qdq")
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq[0].attribute}
    assert attrs == {"axis": 1, "block_size": 16}
    assert qzo_fx.verify_onnx(qm, result.path, (IMAGES,)).ok


def test_codes_equal_the_trained_grid(tmp_path):
    qm, result, model = _export(MLP(), IMAGES, qzo_fx.QuantConfig(weight_bits=3), tmp_path)
    codes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("codes")}
    quantizer = qm.qzo_quant.get_submodule("1_weight")
    expected = (quantizer(qm.get_parameter("1.weight")) / quantizer.scale[:, None]).round().detach().numpy()
    got = next(v for k, v in codes.items() if "1_weight" in k).astype(np.int32)
    np.testing.assert_array_equal(got, expected.astype(np.int32))
    assert got.min() >= -4 and got.max() <= 3


def test_one_bit_and_asymmetric(tmp_path):
    cfg = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=1, ste="tanh"),
                             activation=qzo_fx.QuantSpec(bits=4, symmetric=False, granularity="per_tensor"))
    qm, result, model = _export(MLP(), IMAGES, cfg, tmp_path)
    assert "Clip" in result.op_types  # 4-bit activations in uint8 storage: QCDQ
    # ORT adds biases to int32 sums at s_act * s_weight, a coarse step at 4 bits: the model trains
    # with that rounding and the file stores those int32 biases, so the default session agrees.
    biases = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32 and i.name.endswith("codes")]
    assert len(biases) == 2
    assert qzo_fx.verify_onnx(qm, result.path, (torch.rand(6, 1, 28, 28),)).ok


def test_lowering_keeps_prepared_model_and_is_exact():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(SmallCNN(), W8A8, example_inputs=(IMAGES,))
    qm.eval()
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    lowered = lower_for_export(qm, fold_bn=False)
    torch.testing.assert_close(lowered(IMAGES), qm(IMAGES), rtol=0, atol=0)
    folded = lower_for_export(qm)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in folded.named_modules() if n in
                   {str(x.target) for x in folded.graph.nodes if x.op == "call_module"})
    # Folding reorders float arithmetic, which may flip one rounding of a later quantizer: compare in
    # output steps (8-bit grid over the output range), the unit verify_onnx uses.
    step = float(qm(IMAGES).abs().max()) / 127
    assert float((folded(IMAGES) - qm(IMAGES)).abs().max()) <= step
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in before.items())


def test_target_lint(tmp_path):
    asym = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=8, symmetric=False))
    qm = qzo_fx.prepare(MLP(), asym)
    with pytest.raises(qzo_fx.ExportError, match="TensorRT rejects non-zero zero points"):
        qzo_fx.export_onnx(qm, (IMAGES,), tmp_path / "a.onnx", target="tensorrt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qzo_fx.export_onnx(qzo_fx.prepare(MLP(), qzo_fx.QuantConfig(weight_bits=8)), (IMAGES,), tmp_path / "b.onnx",
                           target="cuda")
    assert any("CUDA provider" in str(w.message) for w in caught)
    bad = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=512),
                             overrides={"3": {"weight": None}})
    with pytest.raises(qzo_fx.ExportError, match="block size 512"):
        qzo_fx.export_onnx(qzo_fx.prepare(MLP((1024, 8)), bad), (torch.randn(2, 1024),), tmp_path / "c.onnx")


def test_session_falls_back_to_cpu(tmp_path):
    _, result, _ = _export(MLP(), IMAGES, W4, tmp_path)
    session = qzo_fx.onnx_session(result.path, target="cuda")
    assert session.get_providers()[0] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(qzo_fx.ExportError, match="target"):
        qzo_fx.onnx_session(result.path, target="npu")


@pytest.mark.gpu
def test_cuda_provider_really_runs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU / onnxruntime-gpu here")
    qm, result, _ = _export(MLP(), IMAGES, W4, tmp_path)
    report = qzo_fx.verify_onnx(qm, result.path, (IMAGES,), target="cuda")
    assert report.provider == "CUDAExecutionProvider" and report.ok


def test_batchnorm_subclasses_with_activation_fold_and_keep_the_activation(tmp_path):
    class BatchNormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d
        def forward(self, x):
            return torch.nn.functional.silu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNormAct(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(IMAGES,))
    result = qzo_fx.export_onnx(qm, (IMAGES,), tmp_path / "bnact.onnx", target="cpu")
    # Capture traces into the subclass: its F.batch_norm folds into the conv, its SiLU stays.
    assert "BatchNormalization" not in result.op_types
    assert result.op_types.get("Sigmoid") == 1 and result.op_types.get("Mul") == 1
    assert qzo_fx.verify_onnx(qm, result.path, (IMAGES,)).ok



def test_data_dependent_branch_names_the_line_and_the_way_out(tmp_path):
    x = torch.randn(2, 8)
    qm = qzo_fx.prepare(DataDependent(), W8A8, example_inputs=(x,))
    with pytest.raises(qzo_fx.ExportError) as info:
        qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", target="cpu")
    first = str(info.value).splitlines()[0]
    assert "research.py" in first and "if h.mean() > 0:" in first and "torch.cond" in first
    assert not (tmp_path / "m.onnx").exists()


class Ranker(nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1).values.unsqueeze(1)  # no ONNX translation in torch.onnx


def test_op_torch_onnx_cannot_translate_names_the_module_and_op(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), Ranker(), nn.Linear(1, 2))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8))
    with pytest.raises(qzo_fx.ExportError) as info:
        qzo_fx.export_onnx(qm, (torch.randn(3, 8),), tmp_path / "m.onnx")
    first = str(info.value).splitlines()[0]
    assert "module '1' (Ranker)" in first and "kthvalue" in first
    assert not (tmp_path / "m.onnx").exists()


class NoisyEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x + 0.1 * torch.rand_like(x))  # noise in eval mode too


def test_random_ops_in_the_eval_graph_are_refused(tmp_path):
    qm = qzo_fx.prepare(NoisyEval(), qzo_fx.QuantConfig(weight_bits=8))
    with pytest.raises(qzo_fx.ExportError, match="random ops.*RandomUniformLike"):
        qzo_fx.export_onnx(qm, (torch.randn(3, 8),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class LengthBeside(nn.Module):
    """A container holding a number beside its tensors, as a sliding-window cache layer does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return {"y": self.lin(x), "length": x.shape[0], "z": x.sum(-1)}


def test_numbers_in_the_output_are_not_file_outputs(tmp_path):
    x = torch.randn(3, 8)
    qm = qzo_fx.prepare(LengthBeside(), W8A8, example_inputs=(x,))
    qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", target="cpu")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    x5 = torch.randn(5, 8)
    y, z = session.run(None, {session.get_inputs()[0].name: x5.numpy()})
    qm.eval()
    expected = qm(x5)
    assert expected["length"] == 5
    np.testing.assert_allclose(z, expected["z"].detach().numpy(), rtol=1e-6, atol=1e-6)
    assert y.shape == (5, 4)
    assert qzo_fx.verify_onnx(qm, tmp_path / "m.onnx", (x5,)).ok


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, gate=None):
        return self.fc(x) * gate


def test_keyword_inputs_are_named_alike_in_export_and_verify(tmp_path):
    torch.manual_seed(0)
    x, gate = torch.randn(2, 8), torch.rand(2, 4)
    qm = qzo_fx.prepare(_Gated(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,),
                        example_kwargs={"gate": gate})
    path = qzo_fx.export_onnx(qm, (x,), tmp_path / "g.onnx", example_kwargs={"gate": gate}).path
    assert qzo_fx.verify_onnx(qm, path, (x,), example_kwargs={"gate": gate}).ok
    with pytest.raises(qzo_fx.ExportError, match="both"):
        qzo_fx.verify_onnx(qm, path, (x,), kwargs={"gate": gate}, example_kwargs={"gate": gate})


def test_float_weights_beside_quantized_activations_are_refused_for_onnx_runtime(tmp_path):
    # ORT's default session would quantize these weights itself: another function than the model.
    qm = qzo_fx.prepare(MLP((16, 8, 4)), qzo_fx.QuantConfig(weight=None, activation_bits=8),
                        example_inputs=(torch.randn(2, 16),))
    with pytest.raises(qzo_fx.ExportError, match="WeightBiasQuantization"):
        qzo_fx.export_onnx(qm, (torch.randn(2, 16),), tmp_path / "a.onnx")


def test_portable_weight_only_linears_warn_about_ort_cpu_rewrite_and_the_way_out(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)), torch.randn(2, 8, 32)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(x,)).eval()
    with pytest.warns(UserWarning, match="accuracy level 4"):
        path = qzo_fx.export_onnx(qm, (x,), tmp_path / "p.onnx", target="portable").path
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = onnxruntime.InferenceSession(str(path), options)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, qm(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_float64_model_is_refused_with_the_way_out(tmp_path):
    qm = qzo_fx.prepare(MLP((16, 8, 4)), qzo_fx.QuantConfig(weight_bits=4)).double()
    with pytest.raises(qzo_fx.ExportError, match=r"qm.float\(\)"):
        qzo_fx.export_onnx(qm, (torch.randn(2, 16, dtype=torch.float64),), tmp_path / "d.onnx")
    with pytest.raises(qzo_fx.ExportError, match="no file"):
        qzo_fx.verify_onnx(qm.float(), tmp_path / "missing.onnx", (torch.randn(2, 16),))
