"""Rounding ties between torch and ORT's default session: followed when torch's input sits at the
rounding boundary, reported as unexplained (and failing parity) when the codes differ for a real reason."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qzo_fx
from qzo_fx.exporters.ties import RTOL, TieCount, probe_model, quantizer_key, resolve_codes
from qzo_fx.models import MLP

pytestmark = pytest.mark.filterwarnings("ignore")

STEP, ZERO = torch.tensor(0.1), torch.tensor(128.0)


def _fake_quant(x):
    return torch.ops.qzo.fake_quant(x, STEP, ZERO, 0, 255, 0, 0, "identity")


def test_tie_takes_ort_code_and_real_difference_is_unexplained():
    # Element 0 sits on the boundary between codes 130 and 131 (x/s = 2.5 above the zero point, a
    # hair above it in torch): ORT's 130 is a tie. Element 1: ORT's code is off by one with torch's
    # input in the middle of its step -- no tie. Element 2 agrees.
    x_torch = torch.tensor([0.25 + 1e-7, 1.0, -0.3])
    codes_ort = torch.tensor([130, 139, 125], dtype=torch.int32)
    count = TieCount()
    out = resolve_codes(x_torch, codes_ort, STEP, ZERO, 0, 255, _fake_quant(x_torch), count)
    assert (count.codes, count.ties, count.unexplained) == (3, 1, 1)
    # In quantization steps: the tie moved down one step to ORT's code, the rest is torch's.
    assert torch.equal(torch.round(out / STEP), torch.tensor([2.0, 10.0, -3.0]))


def test_inputs_farther_than_float_precision_from_the_boundary_are_not_ties():
    # The tolerance is RTOL of the tensor's range in steps (here 100 steps): 3x that is no tie,
    # nor is a code two steps away however close the input is to a boundary.
    x_torch = torch.tensor([0.25 + 3 * RTOL * 100 * 0.1, 10.0, 0.35])
    codes_ort = torch.tensor([130, 228, 130], dtype=torch.int32)
    count = TieCount()
    resolve_codes(x_torch, codes_ort, STEP, ZERO, 0, 255, _fake_quant(x_torch), count)
    assert (count.ties, count.unexplained) == (0, 2)


def _exported_mlp(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    qm = qzo_fx.prepare(MLP(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    result = qzo_fx.export_onnx(qm, (x,), tmp_path / "m.onnx", target="cpu")
    return qm, x, result.path


def test_probe_model_exposes_the_codes_of_every_quantize_linear_only(tmp_path):
    qm, _, path = _exported_mlp(tmp_path)
    model = onnx.load(str(path))
    quantizes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    probed, probes = probe_model(model)
    assert [codes for _, codes in probes] == [n.output[0] for n in quantizes]
    outputs = {o.name for o in probed.graph.output}
    # Codes only: a QuantizeLinear's float input as a graph output would stop ORT fusing its producer.
    assert all(n.output[0] in outputs and n.input[0] not in outputs for n in quantizes)
    hidden = qm.qzo_quant.get_submodule("3_input")
    assert probes[1][0] == quantizer_key(hidden.scale.numpy(), hidden.zero_point.numpy())
    assert len(model.graph.output) == 1  # the caller's model is left as it was


def test_clean_export_has_no_unexplained_codes(tmp_path):
    qm, x, path = _exported_mlp(tmp_path)
    report = qzo_fx.verify_onnx(qm, path, (x,))
    assert report.ok and report.unexplained == 0 and report.codes == 16 * (784 + 256)
    assert report.outputs[0].steps <= report.raw_steps + 1e-9


def test_wrong_activation_scale_in_the_file_fails_as_unexplained(tmp_path):
    qm, x, path = _exported_mlp(tmp_path)
    model = onnx.load(str(path))
    hidden = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][1]
    kept = next(i for i in model.graph.initializer if i.name == hidden.input[1])
    # An export bug: the hidden activation's QuantizeLinear scale 3% off (its DequantizeLinear keeps it).
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(kept) * np.float32(1.03), "wrong"))
    hidden.input[1] = "wrong"
    onnx.save(model, str(path))
    report = qzo_fx.verify_onnx(qm, path, (x,))
    # That quantizer's codes match no quantizer of the model: every one of them is unexplained.
    assert not report.ok and report.unexplained >= 16 * 256 and "FAILED" in str(report)


class _SharedInputs(torch.nn.Module):
    """Three blocks, each a LayerNorm feeding three projections (one quantizer, three calls)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(dim) for _ in range(3)])
        self.projections = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(9)])

    def forward(self, x):
        for i, norm in enumerate(self.norms):
            h = norm(x)
            x = x + sum(self.projections[3 * i + j](h) for j in range(3))
        return x


def test_quantizers_sharing_a_scale_and_zero_point_are_told_apart_by_their_codes(tmp_path):
    # On a scale grid many quantizers have the same scale and zero point; here all do. Each call
    # must still meet its own QuantizeLinear, and three calls on one tensor meet one.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    qm = qzo_fx.prepare(_SharedInputs(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,),
                        capture="export")
    with torch.no_grad():
        for q in qm.qzo_quant.children():
            if q.role == "activation":
                q.scale.fill_(0.03125), q.zero_point.fill_(128)
    path = qzo_fx.export_onnx(qm, x, tmp_path / "shared.onnx").path
    report = qzo_fx.verify_onnx(qm, path, (torch.randn(2, 5, 16),))
    assert report.ok and report.unexplained == 0, str(report)
    assert report.runs[0].counts.codes > 0


def test_each_call_meets_the_probe_with_its_codes_whatever_the_order():
    # Two quantizer calls with one scale and zero point; ORT's QuantizeLinear nodes come in the
    # other order, and the first tensor is quantized twice (one QuantizeLinear in the file).
    from collections import deque

    from qzo_fx.exporters.ties import _FollowOrtTies

    a, b = torch.linspace(-3, 3, 50), torch.linspace(2, -1, 50)
    codes = {name: torch.round(t / STEP).add(ZERO).clamp(0, 255).to(torch.int32) for name, t in (("a", a), ("b", b))}
    probes = {quantizer_key(STEP.numpy(), ZERO.numpy()): deque([codes["b"], codes["a"]])}
    count = TieCount()
    with _FollowOrtTies(probes, count):
        for t in (a, a, b):
            _fake_quant(t)
    assert (count.codes, count.ties, count.unexplained) == (100, 0, 0)
    assert not any(probes.values())  # every probe met its call
