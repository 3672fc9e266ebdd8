from __future__ import annotations

import dataclasses

import pytest
import torch.nn as nn

import qzo_fx
from qzo_fx import ConfigError, QuantConfig, QuantSpec, QzoError


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"granularity": "per_row"}, "granularity"),
    ({"ste": "magic"}, "ste"), ({"ste": "tanh", "bits": 2}, "ste"), ({"scale_init": "minmax"}, "scale_init"),
    ({"group_size": 0}, "group_size"), ({"bits": 1, "symmetric": False}, "symmetric"),
])
def test_invalid_spec_names_field_value_and_range(kwargs, field):
    with pytest.raises(ConfigError) as info:
        QuantSpec(**kwargs)
    assert isinstance(info.value, QzoError)
    assert info.value.field == field and "allowed" in str(info.value)


def test_qrange():
    assert QuantSpec(bits=2).qrange == (-2, 1)
    assert QuantSpec(bits=2, narrow_range=True).qrange == (-1, 1)
    assert QuantSpec(bits=4, symmetric=False).qrange == (0, 15)
    assert QuantSpec(bits=1).qrange == (-1, 1)


def test_shortcuts_and_frozen():
    cfg = QuantConfig(weight_bits=2, activation_bits=8)
    assert cfg.weight.bits == 2 and cfg.activation.bits == 8 and cfg.activation.granularity == "per_tensor"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight = None  # type: ignore[misc]


def test_overrides_by_type_then_name_and_skip():
    cfg = QuantConfig(weight_bits=2, overrides={nn.Conv2d: {"weight": {"bits": 4}}, "head*": {"weight": {"bits": 8}},
                                                "emb": {"weight": None}}, skip=("stem",))
    assert cfg.resolve("body", nn.Conv2d(1, 1, 1))[0].bits == 4
    assert cfg.resolve("head.fc", nn.Linear(1, 1))[0].bits == 8
    assert cfg.resolve("emb", nn.Embedding(2, 2))[0] is None
    assert cfg.resolve("stem", nn.Linear(1, 1)) == (None, None)


def test_bad_overrides_and_activation_granularity():
    with pytest.raises(ConfigError, match="overrides"):
        QuantConfig(overrides={"x": {"weights": None}})
    with pytest.raises(ConfigError, match="fields of QuantSpec"):
        QuantConfig(overrides={"x": {"weight": {"bitz": 3}}})
    with pytest.raises(ConfigError, match="per_tensor"):
        QuantConfig(activation=QuantSpec(granularity="per_channel"))


@pytest.mark.parametrize("make", [
    lambda: QuantSpec(percentile="99"), lambda: QuantSpec(bits=True), lambda: QuantConfig(weight={"bits": 4}),
    lambda: QuantConfig(skip=None), lambda: QuantConfig(overrides=[("fc", {"bits": 4})]),
    lambda: __import__("qzo_fx").FOGZO(beta_min="0.9"), lambda: __import__("qzo_fx").FOGZO(seed=1.5),
    lambda: __import__("qzo_fx").NSPSA(eps="1e-3"), lambda: __import__("qzo_fx").ZOQO(lr=None),
    lambda: __import__("qzo_fx").FOGZO(ste_fraction=0.5),  # a fraction of total_steps, which is unset
], ids=["percentile-str", "bits-bool", "weight-dict", "skip-none", "overrides-list", "beta-str", "seed-float",
        "eps-str", "lr-none", "ste-fraction-without-total"])
def test_wrong_types_are_config_errors_naming_the_field(make):
    with pytest.raises(ConfigError):
        make()


def test_one_skip_pattern_given_as_a_string_is_that_pattern():
    config = QuantConfig(weight_bits=4, skip="fc1")
    assert config.skip == ("fc1",)
    assert config.resolve("fc1", None) == (None, None) and config.resolve("f", None)[0] is not None


def test_type_overrides_apply_to_torch_export_captures():
    import torch

    import qzo_fx

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    config = QuantConfig(weight_bits=4, overrides={nn.Linear: {"weight": {"bits": 2}}})
    qm = qzo_fx.prepare(model, config, example_inputs=(torch.randn(2, 8),), capture="export")
    assert {q.bits for q in qzo_fx.list_quantizers(qm) if q.role == "weight"} == {2}


@pytest.mark.parametrize("build, wrong, meant", [
    (lambda: qzo_fx.QuantConfig(bits=4), "bits", "weight_bits"),
    (lambda: qzo_fx.QuantSpec(bit=4), "bit", "bits"),
    (lambda: qzo_fx.FOGZO(steps=10), "steps", "total_steps"),
])
def test_an_unknown_keyword_names_the_closest_field(build, wrong, meant):
    with pytest.raises(qzo_fx.ConfigError, match=f"{wrong}=.*Did you mean {meant}"):
        build()
