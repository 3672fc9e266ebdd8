from __future__ import annotations

import torch
import torch.nn as nn

import qzo_fx
from tests.zoo.research import AttentionBlock, DataDependent, LSTMTagger


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class RNNTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(30, 8), nn.RNN(8, 16, batch_first=True), nn.Linear(16, 5)

    def forward(self, idx):
        return self.out(self.rnn(self.emb(idx))[0])


def test_examine_traceable_model_lists_float_weights_without_changing_it():
    model = RNNTagger()
    before = _state(model)
    report = qzo_fx.examine(model)
    assert report.plan == "graph mode (symbolic)"
    assert len(report.quantizable) == 2  # the embedding and the output linear; nn.RNN has no rule
    rnn = [f for f in report.findings if f.where == "rnn"]
    assert rnn and rnn[0].kind == "float weight" and "RNN" in rnn[0].detail
    assert not [f for f in qzo_fx.examine(LSTMTagger()).findings if f.where == "lstm"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "prepare will" in str(report)


def test_examine_untraceable_model_names_place_reason_and_plan():
    report = qzo_fx.examine(DataDependent(), (torch.randn(2, 8),))
    assert report.plan.startswith("partial capture")
    root = [f for f in report.findings if f.kind == "untraceable"]
    assert root and root[0].where == "" and "control flow" in root[0].detail
    assert root[0].location.endswith(".py:" + root[0].location.rsplit(":", 1)[1]) and "research.py" in root[0].location


def test_examine_counts_attention_as_quantizable():
    report = qzo_fx.examine(AttentionBlock())
    assert len(report.quantizable) == 2 and not [f for f in report.findings if f.where == "attn"]


def test_examine_a_prepared_model_reports_its_quantizers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8),
                        example_inputs=(torch.randn(2, 3, 8, 8),))
    report = qzo_fx.examine(qm)
    quantizers = qzo_fx.list_quantizers(qm)
    assert report.plan.startswith(f"already prepared: {len(quantizers)} quantizers")
    assert report.quantizable == [q.target for q in quantizers] and len(quantizers) == 4  # 2 weights, 2 inputs
