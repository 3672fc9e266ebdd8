"""The model zoo: name -> :class:`~tests.zoo.cases.Entry` (family, factory, optional package).

Random init, tiny configs and inputs (CPU-sized), no downloads. ``SMOKE`` is a small, fast and
diverse selection for CI (``pytest -m zoo_smoke``).
"""
from __future__ import annotations

from tests.zoo.cases import Case, Entry, torchvision_shim
from tests.zoo.hf import HUGGINGFACE
from tests.zoo.research import RESEARCH
from tests.zoo.research_layers import RESEARCH_LAYERS
from tests.zoo.vision import TIMM, TORCHVISION

__all__ = ["ZOO", "SMOKE", "FAMILIES", "Case", "Entry", "torchvision_shim"]

ZOO: dict[str, Entry] = {**TIMM, **TORCHVISION, **HUGGINGFACE, **RESEARCH, **RESEARCH_LAYERS}
FAMILIES = ("timm", "torchvision", "huggingface", "research code")

# One convolutional network with BatchNorm, one transformer LLM, one encoder with keyword
# inputs, and hand-written code with tied weights and with a train-only branch.
SMOKE = ("tv/mobilenet_v3_small", "hf/llama", "hf/bert", "hand/tied_embeddings", "hand/train_branch_aux_output")
