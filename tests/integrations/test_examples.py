"""The examples run as a user runs them, with few steps."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The examples run in a fresh interpreter; the test environment's torchvision needs its shim there too.
BOOTSTRAP = ("import runpy, sys; from tests.zoo.models import torchvision_shim; torchvision_shim(); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _run(example: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(ROOT / "examples" / example), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_hf_llama_qat_trains_exports_int4_and_generates_like_torch(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("onnxruntime")
    printed = _run("hf_llama_qat.py", "--steps", "12", "--out", str(tmp_path))
    before = float(re.search(r"perplexity at random init ([0-9.]+)", printed).group(1))
    after = float(re.search(r"\); test perplexity ([0-9.]+)", printed).group(1))
    assert after < before  # 12 steps already move a random init towards the text
    assert int(re.search(r"(\d+) MatMulNBits", printed).group(1)) > 0
    assert "identical to torch's greedy decode of the prepared model: True" in printed
