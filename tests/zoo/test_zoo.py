"""The model zoo end to end (run apart: ``pytest -m zoo``; needs the ``zoo`` extra)."""
from __future__ import annotations

import pytest
import torch

from tests.zoo.models import ZOO
from tests.zoo.pipeline import STAGES, run_pipeline

pytestmark = pytest.mark.zoo


def _requires(family: str) -> None:
    needed = {"timm": "timm", "torchvision": "torchvision", "huggingface": "transformers"}.get(family)
    if needed:
        pytest.importorskip(needed)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name):
    family, factory = ZOO[name]
    _requires(family)
    torch.manual_seed(0)
    result = run_pipeline(name, family, factory)
    assert result.user_model_untouched, f"{name}: the user's model changed"
    if not result.ok:
        # Every failure must be a QzoError naming the place and the way out, never a raw traceback.
        assert result.qzo_error, f"{name}: raw {result.error} at {result.failed_stage}"
        pytest.xfail(f"{result.failed_stage}: {result.error}")
    assert result.passed == list(STAGES)
