"""The Accelerate example trains under two CPU processes (DDP through Accelerate)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_qat.py"


def test_accelerate_example_trains_on_two_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: a free port of its own, so parallel runs do not collide on 29500.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
               "--epochs", "2"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"test accuracy ([0-9.]+) \(2 process", out.stdout)
    assert match, out.stdout
    assert float(match.group(1)) > 0.3  # ten classes: chance is 0.1
