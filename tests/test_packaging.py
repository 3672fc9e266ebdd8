"""passes/ and exporters/ exist only as qzo_fx.passes / qzo_fx.exporters."""
from __future__ import annotations

import subprocess
import sys

import qzo_fx


def test_never_top_level_modules():
    code = ("import sys, qzo_fx, qzo_fx.passes.annotate, qzo_fx.exporters; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('passes', 'exporters')]; "
            "assert not bad, bad; print(qzo_fx.passes.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "qzo_fx.passes"


def test_public_names():
    for name in ("prepare", "QuantConfig", "QzoError", "list_quantizers", "print_tabular", "graph_diff",
                 "to_networkx", "draw_svg"):
        assert hasattr(qzo_fx, name), name
