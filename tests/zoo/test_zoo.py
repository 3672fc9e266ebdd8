"""The model zoo, one test per model (``pytest -m zoo``; ``-m zoo_smoke`` for the CI selection).

A model fails its test when any stage fails (docs/coverage.md, *Method*); nothing is xfailed.
Models whose package (timm, torchvision, transformers) is missing are skipped.
"""
from __future__ import annotations

import pytest

from tests.zoo.models import SMOKE, ZOO, torchvision_shim
from tests.zoo.pipeline import run_pipeline

pytestmark = pytest.mark.zoo


def _params():
    return [pytest.param(name, marks=[pytest.mark.zoo_smoke] if name in SMOKE else [], id=name) for name in ZOO]


@pytest.mark.parametrize("name", _params())
def test_zoo_model(name):
    entry = ZOO[name]
    if entry.needs:
        torchvision_shim()  # before anything imports torchvision
        pytest.importorskip(entry.needs)
    pytest.importorskip("onnxruntime")
    result = run_pipeline(name, entry)
    failures = [f"{stage} ({result.stages[stage].kind}): {result.stages[stage].error}" for stage in result.failed()]
    assert not failures, f"{name}: " + "\n".join(failures)
    assert result.end_to_end, f"{name}: stages not run: " + ", ".join(
        s for s, r in result.stages.items() if r.status == "not run")
