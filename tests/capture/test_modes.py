"""Prepared models behave like the user's model in both modes, at other shapes, after copies."""
from __future__ import annotations

import collections
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qzo_fx
from qzo_fx.capture.modes import mode_graph

FLOAT = qzo_fx.QuantConfig(weight=None)
W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)


def drop_path(x, p: float, training: bool):
    """The usual research-code drop path: a per-sample mask, only in training."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class NormAct(nn.BatchNorm2d):
    """BatchNorm + ReLU that reads ``self.training`` in Python, like timm's BatchNormAct2d."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return torch.relu(x)


class ModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), NormAct(8)
        self.conv2, self.norm2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop, self.head = nn.Dropout(0.2), nn.Linear(8, 5)

    def forward(self, x):
        h = self.norm1(self.conv1(x))
        h = h + drop_path(self.norm2(self.conv2(h)), 0.3, self.training)
        return self.head(self.drop(h.mean((2, 3))))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _random_ops(graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if "bernoulli" in str(n.target) or "rand" in str(n.target)}


def test_nothing_quantized_equals_the_float_model_in_both_modes():
    torch.manual_seed(0)
    model, x = ModeNet(), torch.randn(4, 3, 8, 8)
    qm = qzo_fx.prepare(model, FLOAT, example_inputs=(x,))
    model.eval(), qm.eval()
    with torch.no_grad():
        assert _rel(qm(x), model(x)) <= 1e-6
        assert _rel(qm(x[:3]), model(x[:3])) <= 1e-6  # another batch size
    model.train(), qm.train()
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert _rel(qm(x), expected) <= 1e-6  # same dropout and drop-path draws, batch statistics
    assert torch.equal(qm.get_buffer("norm1.running_mean"), model.norm1.running_mean)
    assert int(qm.get_buffer("norm1.num_batches_tracked")) == int(model.norm1.num_batches_tracked)


def test_eval_is_deterministic_and_has_no_random_ops():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(ModeNet(), W8A8, example_inputs=(torch.randn(4, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    assert _random_ops(mode_graph(qm, True)) and not _random_ops(mode_graph(qm, False))
    qm.eval()
    first = qm(x)
    qm.eval()
    assert torch.equal(qm(x), first)
    assert qm.graph is mode_graph(qm, False)
    qm.train()
    assert qm.graph is mode_graph(qm, True) and not torch.equal(qm(x), first)


def test_both_graphs_share_every_quantizer():
    qm = qzo_fx.prepare(ModeNet(), W8A8, example_inputs=(torch.randn(4, 3, 8, 8),))
    read = [{str(n.target).split(".")[1] for n in mode_graph(qm, mode).nodes
             if n.op == "get_attr" and str(n.target).startswith("qzo_quant.")} for mode in (True, False)]
    assert read[0] == read[1] == {q.name for q in qzo_fx.list_quantizers(qm)}


def test_prepared_model_starts_in_the_models_mode():
    model = ModeNet().eval()
    assert not qzo_fx.prepare(model, W8A8, example_inputs=(torch.randn(2, 3, 8, 8),)).training
    assert qzo_fx.prepare(model.train(), W8A8, example_inputs=(torch.randn(2, 3, 8, 8),)).training


class TokenNet(nn.Module):
    """Forces torch.export (data-dependent slicing by a Python int from a tensor would not
    trace symbolically); dropout and a training branch."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.drop = nn.Embedding(50, 16), nn.Linear(16, 7), nn.Dropout(0.1)

    def forward(self, ids, mask=None):
        h = self.drop(self.emb(ids))
        if self.training:
            h = h * 1.0
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.fc(h)


def test_torch_export_captures_switch_modes_and_take_other_shapes():
    torch.manual_seed(0)
    model, ids = TokenNet(), torch.randint(0, 50, (2, 6))
    qm = qzo_fx.prepare(model, FLOAT, example_inputs=(ids,), capture="export")
    assert qm.meta["qzo.capture"].method == "export"
    qm.eval(), model.eval()  # no NotImplementedError
    for shape in ((2, 6), (5, 9), (3, 1)):
        other = torch.randint(0, 50, shape)
        with torch.no_grad():
            assert _rel(qm(other), model(other)) <= 1e-6, shape
    qm.train(), model.train()
    torch.manual_seed(3)
    expected = model(ids)
    torch.manual_seed(3)
    assert _rel(qm(ids), expected) <= 1e-6


def test_static_shapes_on_request():
    ids = torch.randint(0, 50, (2, 6))
    qm = qzo_fx.prepare(TokenNet(), FLOAT, example_inputs=(ids,), capture="export", dynamic_shapes=False)
    assert "static" in qm.meta["qzo.capture"].shapes


def test_optional_none_argument_is_captured_as_none():
    torch.manual_seed(0)
    model, ids = TokenNet().eval(), torch.randint(0, 50, (2, 6))
    qm = qzo_fx.prepare(model, W8A8, example_inputs=(ids,))  # calibration runs forward(ids) with mask=None
    assert qm.meta["qzo.capture"].specialized == {"mask": None}
    assert qm(ids).shape == model(ids).shape


def _ops(graph) -> tuple[collections.Counter, set]:
    """What a graph computes and reads, in any order (re-tracing code reads an attribute once)."""
    calls = collections.Counter((n.op, str(n.target)) for n in graph.nodes if n.op.startswith("call"))
    return calls, {str(n.target) for n in graph.nodes if n.op == "get_attr"}


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_copies_and_pickles_keep_both_modes(tmp_path, capture):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(ModeNet(), W8A8, example_inputs=(torch.randn(4, 3, 8, 8),), capture=capture)
    x = torch.randn(2, 3, 8, 8)
    expected = qm.eval()(x)
    buffer = io.BytesIO()
    torch.save(qm, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(qm), torch.load(buffer, weights_only=False)):
        assert torch.equal(other.eval()(x), expected)
        assert _random_ops(mode_graph(other.train(), True)) and not _random_ops(mode_graph(other, False))
        assert other.graph is mode_graph(other, True)
        for training in (True, False):  # the same programs: nothing computed at re-trace time baked in
            assert _ops(mode_graph(other, training)) == _ops(mode_graph(qm, training))


def test_state_dict_round_trip_gives_identical_outputs_in_both_modes():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qm = qzo_fx.prepare(ModeNet(), W8A8, example_inputs=(x,))
    opt = torch.optim.Adam(qm.parameters(), 1e-2)
    qm.train()
    qm(x).square().mean().backward()
    opt.step()
    fresh = qzo_fx.prepare(ModeNet(), W8A8, example_inputs=(x,))
    fresh.load_state_dict(qm.state_dict())
    assert torch.equal(fresh.eval()(x), qm.eval()(x))
    torch.manual_seed(5)
    a = qm.train()(x)
    torch.manual_seed(5)
    assert torch.equal(fresh.train()(x), a)


class DeepNormNet(nn.Module):
    """A random-init CNN whose eval-mode activations vanish (running statistics 0 and 1 while the
    convolutions shrink the signal), as torchvision/timm CNNs do at init."""

    def __init__(self, depth: int = 12):
        super().__init__()
        layers = []
        for _ in range(depth):
            conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            nn.init.normal_(conv.weight, std=0.02)
            layers += [conv, nn.BatchNorm2d(8), nn.ReLU()]
        self.stem, self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(*layers), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_random_init_cnn_calibrates_for_training_and_trains_without_nan():
    torch.manual_seed(0)
    model, x = DeepNormNet().eval(), torch.randn(8, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scale needs the floor: train mode showed the range
        qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    qm.train()
    opt = torch.optim.Adam(qm.parameters(), 1e-3)
    step = qzo_fx.train_step(qm, lambda m, b: m(b).square().mean(), qzo_fx.STE())
    for _ in range(3):
        opt.zero_grad()
        step(x)
        assert all(torch.isfinite(p.grad).all() for p in qm.parameters() if p.grad is not None)
        opt.step()
    assert all(torch.isfinite(p).all() for p in qm.parameters())


def test_all_zero_activation_gets_a_typical_step_and_a_warning_naming_it():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
            nn.init.constant_(self.a.bias, -100.0)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))  # b's input is all zeros on any small x

    with pytest.warns(RuntimeWarning, match="only zeros.*b_input"):
        qm = qzo_fx.prepare(Dead(), W8A8, example_inputs=(torch.randn(8, 4),))
    # The step of the only other activation quantizer (a's input), not a degenerate one.
    assert float(qm.qzo_quant.b_input.scale) == pytest.approx(float(qm.qzo_quant.a_input.scale))


def test_a_float_noise_range_gets_a_typical_step_and_a_warning_naming_it():
    class Pooled(nn.Module):
        """The mean of an InstanceNorm output is ~1e-8 in train mode, not in eval mode."""

        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, track_running_stats=True)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Pooled(), torch.randn(4, 3, 12, 12)
    with pytest.warns(RuntimeWarning, match="float noise.*fc_input"):
        qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,))
    assert float(qm.qzo_quant.fc_input.scale) > 1e-3
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their init, as training leaves them
            model.train()(x)
            qm.train()(x)
        assert _rel(qm.eval()(x), model.eval()(x)) < 0.2  # not saturated at a 1e-8 grid


def test_tiny_but_real_ranges_keep_their_own_scale():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(4, 8) * 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = qzo_fx.prepare(model, W8A8, example_inputs=(x,)).eval()
    with torch.no_grad():
        assert _rel(qm(x), model.eval()(x)) < 0.1  # tracks the float model instead of rounding to zero


def test_examine_reports_mode_dependent_parts():
    report = qzo_fx.examine(ModeNet(), (torch.randn(2, 3, 8, 8),))
    where = {f.where: f.detail for f in report.findings if f.kind == "mode-dependent"}
    assert "drop" in where and "norm2" in where  # modules that follow their own mode
    assert any("bernoulli" in detail for detail in where.values())  # drop path, captured per mode
    assert any("batch_norm" in detail for detail in where.values())  # NormAct's Python branch


def test_integer_codes_switch_both_modes_and_back():
    torch.manual_seed(0)
    qm = qzo_fx.prepare(ModeNet(), qzo_fx.QuantConfig(weight_bits=4), example_inputs=(torch.randn(4, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    expected = qm.eval()(x)
    qzo_fx.to_integer_codes(qm)
    assert not any(n.target is torch.ops.qzo.fake_quant.default for mode in (True, False)
                   for n in mode_graph(qm, mode).nodes)
    assert torch.equal(qm.eval()(x), expected)
    assert copy.deepcopy(qm).train()(x).shape == expected.shape  # a copy: training updates BatchNorm statistics
    qzo_fx.to_latent_weights(qm)
    assert torch.equal(qm.eval()(x), expected)
    assert qm.train()(x).shape == expected.shape  # the train graph reads the weights again too


def test_einsum_weights_are_quantized_and_uncovered_weights_warn():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.v = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(3, 12, 4))

        def forward(self, x):
            h = torch.einsum("bsd,de->bse", x, self.w)  # a rule: channels of w from the equation
            return torch.bmm(h, self.v)  # no rule for a parameter in bmm: it stays float, with a warning

    x = torch.randn(3, 6, 16)
    with pytest.warns(UserWarning, match=r"1 weight\(s\) stay in float.*v \(bmm\)"):
        qm = qzo_fx.prepare(Mix(), W8A8, example_inputs=(x,))
    weight = next(q for q in qzo_fx.list_quantizers(qm) if q.role == "weight")
    assert (weight.target, weight.axis, weight.scale_shape) == ("w", 1, (12,))
    finding = [f for f in qzo_fx.examine(Mix(), (x,)).findings if f.kind == "float weight"]
    assert [f.where for f in finding] == ["v"]
