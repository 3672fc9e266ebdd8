"""An example the float model itself cannot take is reported as such, naming the module that
raised, whichever capture path met it (calibration of a symbolic trace, torch.export, partial
capture), and the user's model is left as it was. A model whose root a GraphModule cannot be (a
top-level name torch.fx uses) keeps its root, with its parts prepared."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qzo_fx


class Blocks(nn.Module):
    """Reshapes into blocks of 8 rows: an input whose size 8 does not divide fails."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 8, 8, w).mean(3)


def _convnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Blocks(), nn.Flatten())


class DataDependent(nn.Module):
    """Branches on a value: symbolic tracing fails, so capture goes to torch.export."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(16, 32), nn.LayerNorm(24)

    def forward(self, x):
        h = self.proj(x)
        if h.sum() > 0:
            h = h * 2
        return self.norm(h)  # 32 features into a 24-wide LayerNorm: the float model fails here


def test_a_wrong_image_size_names_the_module():
    """Calibration runs the traced model on the example (weight-only configs never run it)."""
    model = _convnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)  # 12 rows: not a multiple of 8
    with pytest.raises(RuntimeError):
        model(x.clone())  # the float model really fails on it
    model.load_state_dict(before)
    with pytest.raises(qzo_fx.ExampleInputsError, match=r"Sequential itself fails .* in 3 \(Blocks\): RuntimeError"):
        qzo_fx.prepare(model, qzo_fx.QuantConfig(activation_bits=8), example_inputs=(x,))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched
    assert model.training
    qzo_fx.prepare(model, qzo_fx.QuantConfig(), example_inputs=(torch.randn(2, 3, 16, 16),))  # a size it takes


def test_an_export_captured_model_names_the_module():
    model = DataDependent()
    with pytest.raises(qzo_fx.ExampleInputsError, match=r"in norm \(LayerNorm\): RuntimeError") as info:
        qzo_fx.prepare(model, qzo_fx.QuantConfig(), example_inputs=(torch.randn(2, 16),))
    assert isinstance(info.value, qzo_fx.QzoError) and isinstance(info.value, qzo_fx.InputError)


def test_a_model_that_runs_keeps_its_own_error():
    """A capture failure the float model does not share is not blamed on the inputs."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if float(x.sum()) > 1e9 else self.fc(x).relu()

    qm = qzo_fx.prepare(Untraceable(), qzo_fx.QuantConfig(), example_inputs=(torch.randn(2, 4),))
    assert qm(torch.randn(3, 4)).shape == (3, 4)



class MetaLearner(nn.Module):
    """Research code's ``self.meta`` / ``self.graph`` / ``self.code``: names a GraphModule uses itself."""

    def __init__(self, name: str):
        super().__init__()
        setattr(self, name, nn.Linear(4, 4))
        self.name, self.out = name, nn.Linear(4, 2)

    def forward(self, x):
        return self.out(getattr(self, self.name)(x))


@pytest.mark.parametrize("name", ["meta", "graph", "code"])
def test_a_top_level_name_graph_modules_use_keeps_the_root_and_prepares_its_parts(name):
    model, x = MetaLearner(name).eval(), torch.randn(2, 4)
    exact = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=None), example_inputs=(x,))
    assert torch.equal(exact.eval()(x), model(x))
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
    assert isinstance(qm, MetaLearner) and "" in qm.qzo_partial.eager
    assert {f"{name}.weight", "out.weight"} <= {q.target for q in qzo_fx.list_quantizers(qm)}
    with pytest.raises(qzo_fx.CaptureError, match=rf"top-level attribute '{name}' \(Linear\).*capture='auto'"):
        qzo_fx.prepare(model, example_inputs=(x,), capture="symbolic")
