"""A BatchNorm that folds into nothing (after a concat, as in DenseNet) is computed in eval mode as one
multiply and one add per element, which ONNX Runtime and the spec's evaluator round as torch does."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from tests.zoo.onnx_check import file_info, reference_evaluator

W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


class DenseBlock(nn.Module):
    """Two dense layers (BatchNorm -> ReLU -> conv on the concat of all earlier features)."""

    def __init__(self, width: int = 16, growth: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.norms = nn.ModuleList([nn.BatchNorm2d(width + i * growth) for i in range(3)])
        self.convs = nn.ModuleList([nn.Conv2d(width + i * growth, growth, 3, padding=1) for i in range(2)])
        self.head = nn.Linear(width + 2 * growth, 10)

    def forward(self, x):
        features = [self.stem(x)]
        for norm, conv in zip(self.norms, self.convs):
            features.append(conv(F.relu(norm(torch.cat(features, 1)))))
        return self.head(F.relu(self.norms[-1](torch.cat(features, 1))).mean((2, 3)))


def _affine_count(qm) -> int:
    return sum(str(n.target) == "qzo.batchnorm_affine.default" for n in qm.qzo_mode_graphs[False].nodes)


def test_a_dense_block_file_gives_the_model_outputs_in_both_runtimes(tmp_path):
    torch.manual_seed(0)
    model = DenseBlock()
    x = torch.randn(4, 3, 32, 32)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    assert _affine_count(qm) == 3
    optimizer = torch.optim.Adam(qm.parameters(), lr=1e-2)
    for _ in range(3):  # running statistics and BatchNorm parameters move
        qm.train()
        optimizer.zero_grad()
        F.cross_entropy(qm(x), torch.arange(4)).backward()
        optimizer.step()
    qm.eval()
    path = str(qzo_fx.export_onnx(qm, x, tmp_path / "dense.onnx").path)
    session, reference = ort.InferenceSession(path), reference_evaluator(path, file_info(path))
    for inputs in (x, torch.randn(3, 3, 32, 32)):
        with torch.no_grad():
            expected = qm(inputs).numpy()
        step = np.abs(expected).max() / 127
        feed = {session.get_inputs()[0].name: inputs.numpy()}
        assert np.abs(session.run(None, feed)[0] - expected).max() < 1e-3 * step
        assert np.abs(reference.run(None, feed)[0] - expected).max() < 1e-3 * step


def test_the_file_computes_a_standalone_batchnorm_bit_for_bit(tmp_path):
    # torch's and ONNX Runtime's BatchNorm kernels differ in the last bit on about a third of these
    # elements; as a multiply-add, both round every element alike.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.MaxPool2d(2), nn.BatchNorm2d(32))
    with torch.no_grad():
        bn = model[2]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.1, 3), bn.weight.uniform_(0.2, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 34, 34)
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,)).eval()
    assert _affine_count(qm) == 1
    path = str(qzo_fx.export_onnx(qm, x, tmp_path / "bn.onnx").path)
    session, reference = ort.InferenceSession(path), reference_evaluator(path, file_info(path))
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        expected = qm(x).numpy()
    np.testing.assert_array_equal(session.run(None, feed)[0], expected)
    np.testing.assert_array_equal(reference.run(None, feed)[0], expected)


def test_the_multiply_add_is_the_batchnorm_and_trains_like_it():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    grads = []
    for compute in (lambda: bn(x), lambda: torch.ops.qzo.batchnorm_affine(x, bn.running_mean, bn.running_var,
                                                                          bn.weight, bn.bias, bn.eps)):
        for t in (x, bn.weight, bn.bias):
            t.grad = None
        out = compute()
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), [t.grad.clone() for t in (x, bn.weight, bn.bias)]))
    (plain, plain_grads), (affine, affine_grads) = grads
    torch.testing.assert_close(affine, plain, rtol=1e-6, atol=1e-6)
    for got, expected in zip(affine_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_with_nothing_quantized_the_batchnorm_stays():
    model = DenseBlock()
    x = torch.randn(2, 3, 16, 16)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,))
    assert not hasattr(qm, "qzo_mode_graphs") or _affine_count(qm) == 0
    with torch.no_grad():
        assert torch.equal(qm.eval()(x), model.eval()(x))
