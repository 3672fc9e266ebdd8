"""The zoo's own instruments (output flattening, comparisons, reference kernels, the user-model
fingerprint), checked against plain torch so that the zoo's verdicts can be trusted. Fast; no
zoo models, no qzo_fx."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.zoo.cases import Case, Floats, Mask, stochastic_reasons
from tests.zoo.checks import changes, fingerprint
from tests.zoo.outputs import compare, flatten, relative_error, steps_apart


class FakeModelOutput(OrderedDict):
    """The shape of a Hugging Face ModelOutput: an ordered mapping without its None fields."""


def test_flatten_names_every_leaf_and_container():
    pair = namedtuple("Pair", "logits aux")
    out = FakeModelOutput(logits=torch.ones(2, 3), extra=[pair(torch.zeros(1), None), 4])
    paths = [p for p, _ in flatten(out)]
    assert paths == ["out", "out.logits", "out.extra", "out.extra[0]", "out.extra[0].logits", "out.extra[0].aux",
                     "out.extra[1]"]
    assert flatten(out)[0][1] == "<FakeModelOutput>"


def test_compare_reports_a_missing_output_and_still_compares_the_rest():
    expected = FakeModelOutput(logits=torch.ones(2), cache=[torch.ones(1)])
    problems = compare(expected, FakeModelOutput(logits=torch.ones(2) * 1.001), rtol=1e-5)
    assert problems[0].startswith("structure differs: missing out.cache")
    assert "out.logits: relative error 0.001" in problems[1]
    assert compare(expected, FakeModelOutput(logits=torch.ones(2), cache=[torch.ones(1)]), rtol=1e-5) == []


def test_compare_integer_outputs_exactly_and_nan_placement():
    assert compare(torch.tensor([1, 2]), torch.tensor([1, 3]), rtol=1.0) == ["out: 1 of 2 values differ"]
    assert relative_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])) == float("inf")
    assert relative_error(torch.tensor([2.0, -4.0]), torch.tensor([2.0, -4.004])) == pytest.approx(1e-3, rel=1e-4)


def test_steps_apart_is_in_units_of_an_8_bit_grid_over_the_reference():
    reference = np.array([0.0, 1.27, -0.5], dtype=np.float32)
    assert steps_apart(reference, reference + np.float32(0.01)) == pytest.approx(1.0, rel=1e-4)
    assert steps_apart(reference, reference[:2]) == float("inf")


def _pool_model(k, s, p, ceil, size):
    from onnx import TensorProto, helper

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=ceil)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("k,s,p,ceil,size", [(3, 1, 1, 1, 8), (3, 2, 0, 1, 15), (3, 2, 1, 1, 7), (2, 2, 0, 0, 9),
                                             (3, 3, 1, 1, 5)])
def test_reference_maxpool_matches_torch(k, s, p, ceil, size):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from tests.zoo.onnx_check import _MaxPool

    x = np.random.default_rng(0).standard_normal((1, 2, size, size)).astype(np.float32)
    got = ReferenceEvaluator(_pool_model(k, s, p, ceil, size), new_ops=[_MaxPool]).run(None, {"x": x})[0]
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=bool(ceil)).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)


def test_reference_gather_elements_matches_torch_gather():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from tests.zoo.onnx_check import _GatherElements

    node = helper.make_node("GatherElements", ["d", "i"], ["o"], axis=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
                                            helper.make_tensor_value_info("i", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    data = np.random.default_rng(0).standard_normal((3, 70)).astype(np.float32)
    index = np.random.default_rng(1).integers(-70, 70, (2, 5))
    got = ReferenceEvaluator(model, new_ops=[_GatherElements]).run(None, {"d": data, "i": index})[0]
    want = torch.gather(torch.from_numpy(data), 1, torch.from_numpy(np.where(index < 0, index + 70, index)))
    assert np.array_equal(got, want.numpy())


def test_stochastic_rule_sees_dropout_modules_and_declared_random_ops():
    deterministic = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0))
    assert stochastic_reasons(deterministic, Case(deterministic)) == []
    dropout = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    assert stochastic_reasons(dropout, Case(dropout)) == ["1: Dropout(p=0.1)"]
    assert stochastic_reasons(deterministic, Case(deterministic, random_ops=True)) != []


def test_fingerprint_sees_values_modes_hooks_and_ties():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    before = fingerprint(model)
    assert changes(before, fingerprint(model)) == []
    with torch.no_grad():
        model[0].bias.add_(1e-7)
    assert changes(before, fingerprint(model)) == ["parameter 0.bias changed"]
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    before = fingerprint(model)
    model.eval()
    model[1].register_forward_hook(lambda *a: None)
    model[1].weight = model[0].weight
    found = changes(before, fingerprint(model))
    assert any("modes" in f for f in found) and any("tied" in f for f in found)


def test_case_inputs_follow_batch_and_sequence():
    case = Case(nn.Identity(), (Floats(("B", 3)),), {"attention_mask": Mask()}, seq=8)
    args, kwargs = case.inputs(batch=4, seq=12)
    assert args[0].shape == (4, 3) and kwargs["attention_mask"].shape == (4, 12)
    assert kwargs["attention_mask"][-1, -3:].sum() == 0 and kwargs["attention_mask"][0].all()
    assert torch.equal(case.inputs()[0][0], case.inputs()[0][0])  # seeded: the same example every time
