"""passes/ and exporters/ exist only as qzo_fx.passes / qzo_fx.exporters."""
from __future__ import annotations

import subprocess
import sys

import qzo_fx


def test_never_top_level_modules():
    code = ("import sys, qzo_fx, qzo_fx.passes.prepare.annotate, qzo_fx.exporters; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('passes', 'exporters')]; "
            "assert not bad, bad; print(qzo_fx.passes.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "qzo_fx.passes"


def test_public_names():
    # The names fixed by the design card, then the rest of the documented surface.
    card = ("prepare", "QuantConfig", "train_step", "STE", "FOGZO", "NSPSA", "ZOQO", "export_onnx", "verify_onnx",
            "examine", "QzoError")
    more = ("list_quantizers", "print_tabular", "graph_diff", "to_networkx", "draw_svg", "ZOSign", "onnx_session",
            "to_integer_codes", "to_latent_weights", "QuantSpec")
    for name in card + more:
        assert hasattr(qzo_fx, name) and name in qzo_fx.__all__, name


def test_training_import_does_not_load_the_onnx_stack():
    code = ("import sys, qzo_fx; print('onnxscript' in sys.modules); qzo_fx.export_onnx; "
            "print('onnxscript' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.split() == ["False", "True"], out.stderr
