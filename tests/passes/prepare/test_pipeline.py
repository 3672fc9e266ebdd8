"""Golden graph tests per pass, idempotence, and the pass manager's bookkeeping."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import qzo_fx
from qzo_fx.context import PrepareContext
from qzo_fx.errors import PassError
from qzo_fx.pass_infra import DumpPasses, Pass, PassManager, PassResult
from qzo_fx.passes.prepare.annotate import annotate
from qzo_fx.passes.prepare.calibrate import calibrate
from qzo_fx.passes.prepare.cleanup import cleanup
from qzo_fx.passes.prepare.insert_qdq import insert_qdq

FQ = torch.ops.qzo.fake_quant.default


def _ops(gm):
    return [getattr(n.target, "__name__", str(n.target)) if n.op == "call_function" else n.op
            for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


def test_annotate_golden_and_idempotent(mlp):
    gm = torch.fx.symbolic_trace(copy.deepcopy(mlp))
    ctx = PrepareContext(qzo_fx.QuantConfig(weight_bits=2, skip_last=True))
    assert annotate(gm, ctx=ctx).modified
    notes = {n.name: n.meta.get("qzo.annotation") for n in gm.graph.nodes}
    assert notes["_0"].weight.bits == 2 and notes["_0"].weight.axis == 0
    assert notes["_2"] is None  # skip_last
    assert not annotate(gm, ctx=ctx).modified


def test_insert_qdq_golden_order(mlp):
    qm = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=4, activation_bits=8), example_inputs=(torch.randn(2, 16),))
    # Each linear: weight and input fake_quant, then its bias rounded to int32 at s_x * s_w.
    bias = ["mul.Tensor", "detach.default", "zeros_like.default", "fake_quant.default"]
    assert _ops(qm) == ["fake_quant.default", "fake_quant.default", *bias, "linear", "call_module",
                           "fake_quant.default", "fake_quant.default", *bias, "linear"]
    fq = [n for n in qm.graph.nodes if n.target is FQ]
    assert [n.args[3:] for n in fq] == [(-8, 7, 0, 0, "identity"), (0, 255, -1, 0, "identity"),
                                        (-2**31 + 128, 2**31 - 128, 0, 0, "identity")] * 2
    # Every pass run again on the prepared graph changes nothing.
    ctx = PrepareContext(qzo_fx.QuantConfig(weight_bits=4, activation_bits=8), (torch.randn(2, 16),))
    for p in (annotate, insert_qdq, calibrate, cleanup):
        assert not p(qm, ctx=ctx).modified, p.__name__


def test_functional_linear_and_matmul_with_parameter():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))
            self.p = nn.Parameter(torch.randn(8, 3))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w) @ self.p

    qm = qzo_fx.prepare(Raw(), qzo_fx.QuantConfig(weight_bits=3))
    targets = sorted(q.target for q in qzo_fx.list_quantizers(qm))
    assert targets == ["p", "w"]
    p_quant = next(q for q in qzo_fx.list_quantizers(qm) if q.target == "p")
    assert p_quant.axis == 1 and p_quant.scale_shape == (3,)  # output channels of x @ P


def test_tied_weights_share_one_quantizer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx))

    qm = qzo_fx.prepare(Tied(), qzo_fx.QuantConfig(weight_bits=4))
    assert len(qzo_fx.list_quantizers(qm)) == 1
    assert sum(n.target is FQ for n in qm.graph.nodes) == 1


def test_conv_padding_modes_and_transpose_match_float_at_8_bit():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.ConvTranspose2d(4, 3, 2, stride=2),
                          nn.Conv1d(3, 3, 1) if False else nn.Identity())
    x = torch.randn(2, 2, 5, 5)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8))
    assert [q.axis for q in qzo_fx.list_quantizers(qm)] == [0, 1]
    torch.testing.assert_close(qm(x), model(x), atol=0.05, rtol=0.05)


def test_group_size_must_divide_and_names_module(mlp):
    with pytest.raises(qzo_fx.UnsupportedModelError, match="module '0'.*group_size=5"):
        qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=5)))


def test_pass_manager_wraps_failures_and_dumps(tmp_path, mlp):
    gm = torch.fx.symbolic_trace(mlp)

    def broken(gm, *, ctx):
        raise RuntimeError("boom")

    noop = Pass("noop", lambda gm, *, ctx: PassResult(gm, False))
    with pytest.raises(PassError, match=r"pass 'broken' failed after \['noop'\]"):
        PassManager([noop, Pass("broken", broken)]).run(gm)
    PassManager([noop], [DumpPasses(tmp_path)]).run(gm)
    assert (tmp_path / "001_noop.py").read_text().startswith("\n\n\ndef forward") or (tmp_path / "001_noop.py").exists()
    assert gm.meta["qzo.passes"][-1] == ("noop", False)


def test_activation_quant_without_inputs_is_a_clear_error(mlp):
    with pytest.raises(qzo_fx.CalibrationError, match="example_inputs"):
        qzo_fx.prepare(mlp, qzo_fx.QuantConfig(activation_bits=8))


def test_multihead_attention_packed_in_projection_is_quantized():
    from tests.zoo.research import AttentionBlock

    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(2, 5, 16)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    rows = {q.target: q for q in qzo_fx.list_quantizers(qm)}
    assert rows["attn.in_proj_weight"].scale_shape == (48,) and rows["attn.out_proj.weight"].scale_shape == (16,)
    assert sum(q.role == "activation" and q.target == "x" for q in rows.values()) == 1  # q, k, v share it
    qm.eval()
    torch.testing.assert_close(qm(x), model(x), atol=0.02, rtol=0.05)
    quantizer_keys = {k for k in qm.state_dict() if k.startswith("qzo_quant")}
    assert sorted(qm.state_dict()) == sorted(set(model.state_dict()) | quantizer_keys)


@pytest.mark.parametrize("layer,x", [
    (nn.LSTM(8, 12, num_layers=2, batch_first=True), torch.randn(3, 5, 8)),
    (nn.GRU(8, 12, bidirectional=True), torch.randn(5, 3, 8)),
    (nn.LSTM(8, 12), torch.randn(5, 8)),  # unbatched input
])
def test_recurrent_weights_are_quantized_per_gate_row(layer, x):
    torch.manual_seed(0)
    model = nn.Sequential(layer).eval()
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8))
    weights = [n for n in layer._flat_weights_names if n.startswith("weight")]
    rows = {q.target: q for q in qzo_fx.list_quantizers(qm)}
    assert sorted(rows) == sorted(f"0.{n}" for n in weights)
    assert all(rows[f"0.{n}"].scale_shape == (getattr(layer, n).shape[0],) for n in weights)
    qm.eval()
    out, ref = qm(x), model(x)
    torch.testing.assert_close(out[0], ref[0], atol=0.02, rtol=0.05)
    torch.testing.assert_close(out[1][0] if isinstance(out[1], tuple) else out[1],
                               ref[1][0] if isinstance(ref[1], tuple) else ref[1], atol=0.02, rtol=0.05)
