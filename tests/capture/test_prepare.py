"""The prepared model: user's model untouched, STE training, modes, state_dict, listing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import qzo_fx


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()], model.training)


def test_user_model_is_never_changed(cnn):
    before = _snapshot(cnn)
    x = torch.randn(4, 1, 8, 8)
    qm = qzo_fx.prepare(cnn, qzo_fx.QuantConfig(weight_bits=2, activation_bits=8), example_inputs=(x,))
    qm.train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    qm(x).sum().backward()
    opt.step()
    after = _snapshot(cnn)
    assert before[1] == after[1] and before[2] == after[2]
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert all(p.grad is None for p in cnn.parameters())


def test_calibration_leaves_batchnorm_statistics(cnn):
    cnn.train()
    qm = qzo_fx.prepare(cnn, qzo_fx.QuantConfig(activation_bits=8), example_inputs=(torch.randn(4, 1, 8, 8) * 5,))
    assert torch.equal(qm.get_buffer("bn.running_mean"), torch.zeros(4))
    assert qm.training


def test_trains_with_ste_and_weights_get_gradients(mlp):
    qm = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=2))
    qm(torch.randn(8, 16)).square().mean().backward()
    assert qm.get_parameter("0.weight").grad.abs().sum() > 0
    assert qm.get_parameter("2.bias").grad is not None


def test_quantized_weights_lie_on_grid(mlp):
    qm = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=2))
    quantizer = qm.qzo_quant.get_submodule("0_weight")
    w = quantizer(qm.get_parameter("0.weight"))
    codes = w / quantizer.scale[:, None]
    assert torch.equal(codes, codes.round()) and codes.min() >= -2 and codes.max() <= 1


def test_eval_train_modes(cnn):
    qm = qzo_fx.prepare(cnn, qzo_fx.QuantConfig(weight_bits=4))
    x = torch.randn(4, 1, 8, 8)
    qm.eval()
    assert not qm.bn.training
    first = qm(x)
    torch.testing.assert_close(qm(x), first)
    qm.train()
    assert qm.bn.training


def test_state_dict_round_trips_into_fresh_prepare(mlp):
    cfg = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=2, ste="lsq"), activation_bits=8)
    x = torch.randn(5, 16)
    qm = qzo_fx.prepare(mlp, cfg, example_inputs=(x,))
    with torch.no_grad():
        qm.qzo_quant.get_submodule("0_weight").scale.mul_(1.5)
    other = qzo_fx.prepare(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)), cfg, example_inputs=(x,))
    other.load_state_dict(qm.state_dict())
    torch.testing.assert_close(other(x), qm(x))
    assert isinstance(other.qzo_quant.get_submodule("0_weight").scale, nn.Parameter)


def test_listing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    rows = qzo_fx.list_quantizers(qzo_fx.prepare(model, qzo_fx.QuantConfig(
        weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=4, ste="lsq"))))
    assert [(r.target, r.bits, r.granularity, r.scale_shape, r.ste) for r in rows] == [
        ("0.weight", 4, "per_group", (8, 2), "lsq"), ("1.weight", 4, "per_group", (2, 2), "lsq")]


def test_one_bit_weights_train():
    model = nn.Sequential(nn.Linear(8, 4))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=1, ste="approxsign")))
    assert any(n.target is torch.ops.qzo.fake_sign.default for n in qm.graph.nodes)
    qm(torch.randn(3, 8)).sum().backward()
    assert qm.get_parameter("0.weight").grad is not None


class Branchy(nn.Module):
    def __init__(self, on_values: bool = False):
        super().__init__()
        self.fc, self.on_values = nn.Linear(4, 4), on_values

    def forward(self, x):
        # Symbolic tracing cannot follow either branch; torch.export specializes on shapes only.
        if (x.sum() > 0) if self.on_values else (x.shape[0] > 1):
            return self.fc(x)
        return -self.fc(x)


class RawBranchy(nn.Module):
    """Data-dependent control flow and no submodule: nothing can be traced at all."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w if x.sum() > 0 else x @ self.w.t()


def test_capture_errors_name_every_method_tried():
    with pytest.raises(qzo_fx.CaptureError, match="symbolic: .*export: .*No submodule could be traced"):
        qzo_fx.prepare(RawBranchy(), example_inputs=(torch.ones(2, 4),))
    with pytest.raises(qzo_fx.CaptureError, match="export: "):
        qzo_fx.prepare(Branchy(on_values=True), example_inputs=(torch.ones(2, 4),), capture="export")
    with pytest.raises(qzo_fx.CaptureError, match="example_inputs"):
        qzo_fx.prepare(Branchy(), capture="export")


def test_partial_capture_quantizes_traceable_parts_and_trains_in_place():
    x = torch.ones(2, 4)
    model = Branchy(on_values=True)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4, activation_bits=8), example_inputs=(x,))
    assert isinstance(qm, Branchy) and isinstance(qm.fc, torch.fx.GraphModule)
    assert qm.qzo_partial.graph == ["fc"] and "" in qm.qzo_partial.eager
    assert [q.target for q in qzo_fx.list_quantizers(qm)] == ["fc.weight", "fc.input_1"]
    assert isinstance(model.fc, nn.Linear)  # the user's model is untouched
    loss_fn = lambda m, b: m(b).square().mean()
    step = qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(seed=0))
    step(x)
    assert step.strategy.chosen == "inplace" and qm.fc.get_parameter("weight").grad is not None
    with pytest.raises(qzo_fx.TrainStepError, match="partially"):
        qzo_fx.train_step(qm, loss_fn, qzo_fx.FOGZO(), strategy="batched")


def test_export_capture_fallback_on_shape_control_flow():

    x = torch.ones(2, 4)
    qm = qzo_fx.prepare(Branchy(), qzo_fx.QuantConfig(weight_bits=8), example_inputs=(x,))
    assert qm.meta["qzo.capture"].method == "export"
    assert "symbolic" in qm.meta["qzo.capture"].failures
    assert len(qzo_fx.list_quantizers(qm)) == 1


def test_bad_inputs_raise_qzo_errors(mlp):
    with pytest.raises(qzo_fx.QzoError, match="nn.Module"):
        qzo_fx.prepare("not a model")
    with pytest.raises(qzo_fx.QzoError, match="QuantConfig"):
        qzo_fx.prepare(mlp, {"weight_bits": 2})
    with pytest.raises(qzo_fx.CaptureError, match="capture="):
        qzo_fx.prepare(mlp, capture="jit")


class Encoder(nn.Module):
    """Returns a Hugging Face ModelOutput, as every transformers model does."""

    def __init__(self):
        super().__init__()
        self.proj, self.drop = nn.Linear(8, 8), nn.Dropout(0.1)

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.drop(self.proj(x)))


def test_output_classes_are_kept_in_both_modes():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(3, 8)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,))
    # symbolic_trace would return a plain dict (out["last_hidden_state"]): torch.export keeps the class.
    assert qm.meta["qzo.capture"].method == "export" and "plain dict" in qm.meta["qzo.capture"].failures["symbolic"]
    for training in (False, True):
        model.train(training), qm.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        out = qm(x)
        assert type(out) is type(expected)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-6)
    forced = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,), capture="symbolic")
    assert type(forced.eval()(x)) is dict  # as asked: torch.fx's own behaviour


class _TokensAndLabels(nn.Module):
    """A causal-LM-like forward: embeds ``ids``, scores the logits against ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, ids, labels):
        logits = self.head(self.embed(ids))
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("capture", ["export", "symbolic"])
def test_one_tensor_given_as_two_example_arguments_stays_two_inputs(capture):
    # The usual causal-LM example passes input_ids as the labels too: the same tensor object.
    torch.manual_seed(0)
    model, ids = _TokensAndLabels(), torch.randint(0, 16, (2, 6))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(ids,),
                        example_kwargs={"labels": ids}, capture=capture).eval()
    labels = torch.randint(0, 16, (2, 6))
    labels[:, :2] = -100  # prompt masking: not a valid token id
    got, expected = qm(ids, labels=labels), model.eval()(ids, labels)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


class _WithConstants(nn.Module):
    """State outside the state_dict: a non-persistent buffer and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("mean", torch.randn(8), persistent=False)
        self.offset = torch.randn(1, 4)

    def forward(self, x):
        return self.fc(x - self.mean) + self.offset


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_state_dict_keys_are_the_users_plus_the_quantizers(capture, tmp_path):
    torch.manual_seed(0)
    model, x = _WithConstants(), torch.randn(2, 8)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8), example_inputs=(x,), capture=capture)
    torch.save(qm, tmp_path / "qm.pt")
    unpickled = torch.load(tmp_path / "qm.pt", weights_only=False)
    copies = {"prepared": qm, "deepcopy": copy.deepcopy(qm), "unpickled": unpickled}
    for name, prepared in copies.items():
        keys = {k for k in prepared.state_dict() if not k.startswith("qzo_quant.")}
        assert keys == set(model.state_dict()), name
        assert torch.equal(prepared(x), qm(x)), name
    trained = {k: v + 1 for k, v in qm.state_dict().items() if not k.startswith("qzo_quant.")}
    fresh = _WithConstants()
    fresh.load_state_dict(trained)  # strict: a trained prepared model's weights load into the user's class
    assert torch.equal(fresh.fc.weight, trained["fc.weight"])


class _Flagged(nn.Module):
    """An output flag that reaches the forward through **kwargs, as Hugging Face's do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, **kwargs):
        y = self.fc(x)
        return (y, x) if kwargs.get("output_hidden_states") else y


def test_keyword_flags_keep_dynamic_shapes_and_are_checked(tmp_path):
    torch.manual_seed(0)
    model = _Flagged()
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(torch.randn(2, 8),),
                        example_kwargs={"output_hidden_states": True}, capture="export")
    assert qm.meta["qzo.capture"].shapes == "batch and sequence dimensions"
    x = torch.randn(5, 8)
    got, expected = qm(x, output_hidden_states=True), model(x, output_hidden_states=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.save(qm, tmp_path / "qm.pt")
    assert torch.equal(torch.load(tmp_path / "qm.pt", weights_only=False)(x, output_hidden_states=True)[0], got[0])
    with pytest.raises(qzo_fx.InputError, match="output_hidden_states=True"):
        qm(x, output_hidden_states=False)


def test_a_float_checkpoint_sets_weight_scales_from_its_weights(mlp):
    x = torch.randn(4, mlp[0].in_features)
    qm = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(x,))
    pretrained = copy.deepcopy(mlp)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.mul_(3.0)
    qm.load_state_dict(pretrained.state_dict(), strict=False)  # a float checkpoint: no quantizer keys
    direct = qzo_fx.prepare(pretrained, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(x,))
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(qm.state_dict()[key], value, msg=key)
    torch.testing.assert_close(qm.eval()(x), direct.eval()(x))
    with_activations = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=4, activation_bits=8), example_inputs=(x,))
    with pytest.warns(UserWarning, match="no activation scales"):
        with_activations.load_state_dict(pretrained.state_dict(), strict=False)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True, num_layers=2, dropout=0.2)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = self.rnn(x)[0]
        return self.fc(self.attn(h, h, h)[0][:, -1])


def test_quantized_recurrent_and_attention_models_pickle(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    qm = qzo_fx.prepare(_Recurrent(), qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    torch.save(qm, tmp_path / "qm.pt")
    loaded = torch.load(tmp_path / "qm.pt", weights_only=False)
    assert torch.equal(loaded.eval()(x), qm.eval()(x))
    torch.manual_seed(1)
    trained = loaded.train()(x)
    torch.manual_seed(1)
    assert torch.equal(trained, qm.train()(x))  # dropout follows the mode after loading too


def test_torch_transformer_layers_are_quantized_inside():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3))
    x = torch.randn(2, 10, 16)
    plain = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,)).eval()
    for inputs in (x, torch.randn(3, 7, 16)):  # the example's shape and another
        torch.testing.assert_close(plain(inputs), model.eval()(inputs), rtol=1e-5, atol=1e-6)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4), example_inputs=(x,))
    targets = {q.target for q in qzo_fx.list_quantizers(qm)}
    assert {f"0.layers.{i}.{name}.weight" for i in (0, 1) for name in ("linear1", "linear2")} <= targets


def test_low_precision_models_get_a_clear_error(mlp):
    x = torch.randn(2, mlp[0].in_features)
    with pytest.raises(qzo_fx.ConfigError, match="autocast"):
        qzo_fx.prepare(copy.deepcopy(mlp).bfloat16(), qzo_fx.QuantConfig(weight_bits=8), example_inputs=(x,))
    qm = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    with pytest.raises(qzo_fx.InputError, match="float16"):
        qm.half()(x.half())


def test_a_method_of_the_users_class_names_what_a_prepared_model_keeps():
    class Scorer(nn.Linear):
        def score(self, x):
            return self(x).sum()

    qm = qzo_fx.prepare(Scorer(4, 2), qzo_fx.QuantConfig(weight_bits=8))
    assert not hasattr(qm, "score") and not hasattr(qm, "no_such_attribute")
    with pytest.raises(qzo_fx.MethodNotKeptError, match="Scorer's forward"):
        qm.score(torch.randn(1, 4))


def test_a_weight_computed_by_a_hook_is_named_as_left_in_float():
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model(torch.randn(1, 8))  # the hook's weight, recomputed outside autograd: copyable
    with pytest.warns(UserWarning, match=r"0 \(Linear \(its weight is computed by a forward hook"):
        qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=4))
    assert {q.target for q in qzo_fx.list_quantizers(qm)} == {"2.weight"}


def test_a_hook_on_a_layer_the_graph_computes_itself_is_reported(mlp):
    qm = qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=8))
    x = torch.randn(2, mlp[0].in_features)
    seen = []
    qm.get_submodule("1").register_forward_hook(lambda m, i, o: seen.append("relu"))  # called by the graph
    qm.get_submodule("2").register_forward_hook(lambda m, i, o: seen.append("linear"))  # inlined
    with pytest.warns(UserWarning, match="hooks on '2' \\(Linear\\) will not run"):
        qm(x)
    assert seen == ["relu"]


def test_containers_stay_the_users_containers(mlp):
    qm = qzo_fx.prepare(nn.Sequential(mlp, nn.Softmax(-1)), qzo_fx.QuantConfig(weight_bits=8))
    assert isinstance(qm.get_submodule("0"), nn.Sequential) and len(qm.get_submodule("0")) == 3
    assert [type(m) for m in qm.get_submodule("0")] == [nn.Linear, nn.ReLU, nn.Linear]


class _FixedLength(nn.Module):
    """Reshapes by its sequence length where it is 8: torch.export fixes that dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(4, 4)

    def forward(self, ids):
        h = self.emb(ids)
        b, t, _ = h.shape
        if t == 8:
            h = h * 2
        return self.fc(h.reshape(b, t, 4, 4).sum(-1))


def test_a_dimension_the_model_fixes_is_said_at_capture_and_at_the_call():
    ids = torch.randint(0, 50, (2, 8))
    with pytest.warns(UserWarning, match="dim 1 = 8"):
        qm = qzo_fx.prepare(_FixedLength(), qzo_fx.QuantConfig(weight_bits=8), example_inputs=(ids,))
    assert qm(torch.randint(0, 50, (5, 8))).shape == (5, 8, 4)  # the batch stays dynamic
    with pytest.raises(qzo_fx.InputError, match="dimension 1 of size 8 only"):
        qm(torch.randint(0, 50, (2, 11)))


def test_an_example_of_size_one_is_named_as_what_fixed_the_dimension():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="size 1 in the example"):
        qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8), example_inputs=(torch.randint(0, 50, (1, 6)),),
                       capture="export")


class EarlyExit(nn.Module):
    """Research code's early exit: in eval mode, a confident first head returns at once. The
    branch is on values in eval mode only, so the module traces in train mode and not in eval."""

    def __init__(self):
        super().__init__()
        self.a, self.first, self.b, self.second = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        early = self.first(h)
        if not self.training and bool((early.softmax(-1).amax(-1) > 0.99).all()):
            return early
        return self.second(torch.relu(self.b(h))) + early


def test_a_module_that_traces_in_one_mode_only_runs_eagerly_with_its_parts_prepared():
    torch.manual_seed(0)
    model, x = EarlyExit(), torch.randn(4, 8)
    exact = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,))
    for training in (True, False):
        assert torch.equal(exact.train(training)(x), model.train(training)(x))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    assert sorted(qm.qzo_partial.graph) == ["a", "b", "first", "second"] and "" in qm.qzo_partial.eager
    assert {q.target for q in qzo_fx.list_quantizers(qm)} >= {"a.weight", "b.weight", "first.weight", "second.weight"}
    qm.train()(x).square().mean().backward()
    assert qm.get_submodule("b").get_parameter("weight").grad is not None
