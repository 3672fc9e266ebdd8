"""Biases that BatchNorm folding creates: int32 in the file at s_x * s_w * k, and the eval-mode model
rounds them the same way, so the model, the spec (onnx.reference) and ORT's default session agree
without following any rounding tie; the train-mode graph keeps BatchNorm on batch statistics."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

import qzo_fx
from qzo_fx.capture.modes import mode_graph
from qzo_fx.passes.prepare.fold_eval_batchnorm import is_folded_site
from tests.zoo.research_layers import SharedEncoder

pytestmark = pytest.mark.filterwarnings("ignore")
W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


def _conv_bn(conv_bias: bool = False) -> nn.Module:
    """Conv -> BatchNorm -> ReLU -> Conv with BatchNorm statistics as training leaves them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=conv_bias), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return model


def _at_opset_21(model: onnx.ModelProto) -> onnx.ModelProto:
    # onnx.reference implements DequantizeLinear from opset 19 on; int8/int32 Q/DQ mean the same.
    return model if model.opset_import[0].version >= 19 else onnx.version_converter.convert_version(model, 21)


def _steps_apart(expected: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / (np.abs(expected).max() / 127))


def _runtimes(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The file in ORT's default session and in the reference evaluator."""
    file = onnx.load(str(path))
    feed = {file.graph.input[0].name: x.numpy()}
    return {"ort": ort.InferenceSession(str(path)).run(None, feed)[0],
            "reference": ReferenceEvaluator(_at_opset_21(file)).run(None, feed)[0]}


def _conv_biases(file: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(producer op, data type)`` of every Conv/Gemm bias: a DequantizeLinear's int32 input, or an
    initializer's own type."""
    inits = {i.name: i for i in file.graph.initializer}
    producers = {out: node for node in file.graph.node for out in node.output}
    found = []
    for node in file.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            source = producers.get(node.input[2])
            if source is not None and source.op_type == "DequantizeLinear":
                found.append(("DequantizeLinear", TensorProto.DataType.Name(inits[source.input[0]].data_type)))
            else:
                found.append(("initializer", TensorProto.DataType.Name(inits[node.input[2]].data_type)))
    return found


@pytest.mark.parametrize("conv_bias", [False, True], ids=["conv-without-bias", "conv-with-bias"])
def test_folded_bias_is_int32_and_all_three_agree_without_ties(conv_bias, tmp_path):
    model = _conv_bn(conv_bias)
    x = torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    file = onnx.load(str(result.path))
    # No float bias left beside quantized conv inputs: nothing for ORT's WeightBiasQuantization to round.
    assert _conv_biases(file) == [("DequantizeLinear", "INT32")] * 2
    assert "BatchNormalization" not in result.op_types
    probe = torch.randn(16, 3, 16, 16)  # another batch: many codes, every one compared
    with torch.no_grad():
        expected = qm.eval()(probe).numpy()
    for runtime, got in _runtimes(result.path, probe).items():
        assert _steps_apart(expected, got) < 1e-3, runtime
    report = qzo_fx.verify_onnx(qm, result.path, (probe,))
    assert report.ok and report.ties == 0 and report.raw_steps < 1e-3, str(report)


class _BatchNormRelu(nn.BatchNorm2d):
    """A BatchNorm subclass that adds its activation, as timm's BatchNormAct2d does: symbolic
    capture traces into it, so the graph holds ``F.batch_norm`` (and a shape assert), not a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return torch.relu(x)


def _conv_bn_relu_subclass() -> nn.Module:
    model = _conv_bn()
    fused = _BatchNormRelu(8)
    fused.load_state_dict(model[1].state_dict())
    return nn.Sequential(model[0], fused, model[3])


@pytest.mark.parametrize("build, capture", [(_conv_bn_relu_subclass, "auto"), (_conv_bn, "export")],
                         ids=["functional-batch-norm", "torch-export-aten-batch-norm"])
def test_functional_batchnorm_folds_like_a_module(build, capture, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(build(), W8A8, example_inputs=(x,), capture=capture)
    qm.train()
    for seed in range(3):  # running statistics as training leaves them
        qm(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    result = qzo_fx.export_onnx(qm.eval(), (x,), tmp_path / "m.onnx")
    assert "BatchNormalization" not in result.op_types
    assert _conv_biases(onnx.load(str(result.path))) == [("DequantizeLinear", "INT32")] * 2
    probe = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        expected = qm(probe).numpy()
    for runtime, got in _runtimes(result.path, probe).items():
        assert _steps_apart(expected, got) < 1e-3, runtime
    report = qzo_fx.verify_onnx(qm, result.path, (probe,))
    assert report.ok and report.ties == 0, str(report)


def test_int32_codes_are_the_folded_bias_at_input_times_folded_weight_step(tmp_path):
    model = _conv_bn()
    x = torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    file = onnx.load(str(result.path))
    inits = {i.name: numpy_helper.to_array(i) for i in file.graph.initializer}
    conv = next(n for n in file.graph.node if n.op_type == "Conv")
    bias_dq = next(n for n in file.graph.node if n.output[0] == conv.input[2])
    codes, step = inits[bias_dq.input[0]], inits[bias_dq.input[1]]
    # Plain math from the BatchNorm's state and the two quantizers' scales.
    bn = qm.get_submodule("1")
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    s_x = float(qm.qzo_quant.get_submodule("0_input").scale)
    s_w = qm.qzo_quant.get_submodule("0_weight").scale.detach().numpy()
    folded = ((-bn.running_mean) * torch.from_numpy(k) + bn.bias).detach().numpy()
    # exact_scales (the default): the folded weight scale is the 4-bit-mantissa value at or above s_w k.
    grid = np.array([math.ldexp(math.ceil(m * 16), e - 4) for m, e in map(math.frexp, (s_w * k).tolist())])
    assert (grid >= s_w * k).all() and (grid < s_w * k * 1.125).all()
    np.testing.assert_allclose(step, s_x * grid, rtol=1e-6)
    np.testing.assert_array_equal(codes, np.round(folded / step).astype(np.int32))


def test_only_the_eval_graph_folds_and_the_fold_follows_training(tmp_path):
    model = _conv_bn()
    x = torch.randn(4, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    assert not any(is_folded_site(n) for n in mode_graph(qm, True).nodes)
    assert sum(is_folded_site(n) for n in mode_graph(qm, False).nodes) == 1
    # Train mode: BatchNorm normalizes with batch statistics (each channel's mean is its beta).
    with torch.no_grad():
        bn = qm.train().get_submodule("1")
        bn_out = bn(qm.get_submodule("0")(x))
    assert (bn_out.mean(dim=(0, 2, 3)) - bn.bias).abs().max() < 1e-5
    # Training moves BatchNorm statistics, weights and scales; the exported file still matches.
    optimizer = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        qm(torch.randn(4, 3, 16, 16)).square().mean().backward()
        optimizer.step()
    qm.eval()
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    probe = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = qm(probe).numpy()
    for runtime, got in _runtimes(result.path, probe).items():
        assert _steps_apart(expected, got) < 1e-3, runtime


def test_batchnorm_whose_scales_cannot_take_the_fold_scales_the_weight_and_gets_no_nan(tmp_path):
    model = _conv_bn()
    with torch.no_grad():
        model[1].weight[0] = 0.0    # timm zero-initialises some gammas: k = 0, a 0/0 bias step
        model[1].weight[1] = -0.7   # a negative scale: the exporter keeps this BatchNorm
    x = torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    with torch.no_grad():
        out = qm.eval()(x)
    assert torch.isfinite(out).all()
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx")
    # No negative or zero scales: the file multiplies the dequantized weight by k, as the graph does.
    assert "BatchNormalization" not in result.op_types and result.op_types.get("Mul") == 1
    assert _conv_biases(onnx.load(str(result.path)))[0] == ("initializer", "FLOAT")
    for runtime, got in _runtimes(result.path, x).items():
        assert _steps_apart(out.numpy(), got) < 1e-3, runtime


def test_linear_batchnorm1d_and_an_unfolded_export(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(8, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    probe = torch.randn(64, 16)
    with torch.no_grad():
        expected = qm.eval()(probe).numpy()
    folded = qzo_fx.export_onnx(qm, (x,), tmp_path / "folded.onnx")
    assert _conv_biases(onnx.load(str(folded.path))) == [("DequantizeLinear", "INT32")] * 2
    # Unfolded, the file computes the fold itself from its constants, as the eval graph does.
    unfolded = qzo_fx.export_onnx(qm, (x,), tmp_path / "unfolded.onnx", fold_batchnorm=False)
    assert "BatchNormalization" not in unfolded.op_types and "Round" in unfolded.op_types
    for result in (folded, unfolded):
        for runtime, got in _runtimes(result.path, probe).items():
            assert _steps_apart(expected, got) < 1e-3, (result.path.name, runtime)


def test_a_systematic_bias_deviation_is_not_taken_for_ties(tmp_path):
    """A runtime that adds every folded bias one accumulator step off (what rounding a float bias
    again does) moves each output by a small fraction of a step. The codes it flips sit within
    that fraction of a boundary; a window that wide would follow them all as ties."""
    model = _conv_bn()
    x = torch.randn(16, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x[:2],))
    result = qzo_fx.export_onnx(qm, (x[:2],), tmp_path / "m.onnx")
    assert qzo_fx.verify_onnx(qm, result.path, (x,)).ok
    file = onnx.load(str(result.path))
    conv = next(n for n in file.graph.node if n.op_type == "Conv")
    bias_dq = next(n for n in file.graph.node if n.output[0] == conv.input[2])
    codes = next(i for i in file.graph.initializer if i.name == bias_dq.input[0])
    codes.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(codes) + np.int32(1), codes.name))
    onnx.save(file, str(tmp_path / "off.onnx"))
    report = qzo_fx.verify_onnx(qm, tmp_path / "off.onnx", (x,))
    assert not report.ok and report.unexplained > 0, str(report)


def test_eval_mode_computes_the_batchnorm_and_its_gradients_as_the_unfolded_model(tmp_path):
    """The folded eval graph is the same function as conv -> BatchNorm (up to the int32 bias
    rounding), and training in eval mode gets the unfolded form's straight-through gradients."""
    model = _conv_bn(conv_bias=True)
    x = torch.randn(4, 3, 16, 16)
    # Free scales: with exact_scales the fold also moves the codes onto the grid (the next test).
    free = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8, exact_scales=False)
    qm = qzo_fx.prepare(model, free, example_inputs=(x,)).eval()
    quant = qm.qzo_quant
    conv, bn, head = qm.get_submodule("0"), qm.get_submodule("1"), qm.get_submodule("3")

    def reference(inputs):
        y = F.conv2d(quant.get_submodule("0_input")(inputs), quant.get_submodule("0_weight")(conv.weight), conv.bias)
        y = torch.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        return F.conv2d(quant.get_submodule("3_input")(y), quant.get_submodule("3_weight")(head.weight), head.bias)

    grads = []
    for forward in (qm, reference):
        qm.zero_grad()
        out = forward(x)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in (conv.weight, conv.bias, bn.weight, bn.bias)]))
    (folded, folded_grads), (plain, plain_grads) = grads
    assert _steps_apart(plain.numpy(), folded.numpy()) < 0.05  # the int32 bias rounding, far below a step
    for got, expected in zip(folded_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-4)


def test_with_exact_scales_the_fold_refolds_the_codes_onto_the_grid_scale():
    """The eval graph's folded conv against plain math: codes q = round(w_fq / s_w), grid scale S
    at or above s_w k (4-bit mantissa), codes round(q s_w k / S), the bias on the int32 grid at s_x S."""
    model = _conv_bn()
    x = torch.randn(4, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    qm.train()(x)  # running statistics move away from their initial values
    qm.eval()
    quant = qm.qzo_quant
    conv, bn = qm.get_submodule("0"), qm.get_submodule("1")
    s_w = quant.get_submodule("0_weight").scale.detach().reshape(-1, 1, 1, 1)
    s_x = float(quant.get_submodule("0_input").scale)
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    codes = torch.round(quant.get_submodule("0_weight")(conv.weight).detach() / s_w)
    exact = (s_w.flatten() * k).tolist()
    grid = torch.tensor([math.ldexp(math.ceil(m * 16), e - 4) for m, e in map(math.frexp, exact)])
    refolded = torch.round(codes * (torch.tensor(exact) / grid).reshape(-1, 1, 1, 1))
    assert (refolded.abs() <= codes.abs()).all() and (refolded != codes).any()
    bias = (bn.bias - bn.running_mean * k).detach()
    step = s_x * grid
    with torch.no_grad():
        expected = F.conv2d(quant.get_submodule("0_input")(x), refolded * grid.reshape(-1, 1, 1, 1),
                            torch.round(bias / step) * step)
        y = {}
        handle = qm.get_submodule("2").register_forward_hook(lambda m, i, o: y.setdefault("relu_in", i[0]))
        qm(x)
        handle.remove()
    torch.testing.assert_close(y["relu_in"], expected, rtol=0, atol=1e-6)


def test_a_hook_on_a_batchnorm_the_eval_graph_folds_is_warned_about_in_eval_mode():
    model = _conv_bn()
    x = torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    calls = []
    qm.get_submodule("1").register_forward_hook(lambda module, inputs, output: calls.append(1))
    qm.train()(x)
    assert calls == [1]  # train mode calls the BatchNorm module
    with pytest.warns(UserWarning, match="'1'.*folded"):
        qm.eval()(x)
    assert calls == [1]


def test_sites_sharing_a_weight_each_fold_their_own_batchnorm_once(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 12, 12), torch.randn(4, 3, 12, 12)
    qm = qzo_fx.prepare(SharedEncoder(), W8A8, example_inputs=(a, b))
    optimizer = torch.optim.SGD(qm.parameters(), lr=0.05)
    for _ in range(3):  # statistics away from (0, 1): a fold applied twice, or the wrong one, shows
        optimizer.zero_grad()
        qm.train()(torch.randn(4, 3, 12, 12), torch.randn(4, 3, 12, 12) * 2 + 1).square().mean().backward()
        optimizer.step()
    qm.eval()
    result = qzo_fx.export_onnx(qm, (a, b), tmp_path / "m.onnx")
    file = onnx.load(str(result.path))
    feed = {file.graph.input[0].name: a.numpy(), file.graph.input[1].name: b.numpy()}
    with torch.no_grad():
        expected = qm(a, b).numpy()
    got = {"ort": ort.InferenceSession(str(result.path)).run(None, feed)[0],
           "reference": ReferenceEvaluator(_at_opset_21(file)).run(None, feed)[0]}
    for runtime, out in got.items():
        assert _steps_apart(expected, out) < 1e-3, runtime
    assert qzo_fx.verify_onnx(qm, result.path, (a, b)).ok


def test_a_folded_four_bit_weight_stays_int4_in_the_file(tmp_path):
    model, x = _conv_bn(), torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4, activation_bits=8), example_inputs=(x,))
    result = qzo_fx.export_onnx(qm.eval(), (x,), tmp_path / "m.onnx")
    file = onnx.load(str(result.path))
    inits = {i.name: i for i in file.graph.initializer}
    producers = {out: node for node in file.graph.node for out in node.output}
    conv = next(n for n in file.graph.node if n.op_type == "Conv")  # the folded one
    weight = producers[conv.input[1]]
    assert weight.op_type == "DequantizeLinear"
    assert TensorProto.DataType.Name(inits[weight.input[0]].data_type) == "INT4"
    with torch.no_grad():
        expected = qm(x).numpy()
    assert _steps_apart(expected, _runtimes(result.path, x)["ort"]) < 1e-3
