from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import qzo_fx
from qzo_fx.cli import main


def make_model():
    """Factory used by the CLI tests."""
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(3, 6),)


@pytest.fixture
def prepared(mlp):
    return mlp, qzo_fx.prepare(mlp, qzo_fx.QuantConfig(weight_bits=2))


def test_tabular_and_code(prepared, capsys):
    _, qm = prepared
    qzo_fx.print_tabular(qm)
    out = capsys.readouterr().out
    assert out.count("qzo.fake_quant.default") == 2 and "W2 per_channel identity" in out
    assert "torch.ops.qzo.fake_quant.default" in qzo_fx.graph_code(qm)


def test_graph_diff_is_unified(prepared):
    model, qm = prepared
    diff = qzo_fx.graph_diff(model, qm)
    assert diff.startswith("--- before\n+++ after\n")
    assert sum(line.startswith("+") and "torch.ops.qzo.fake_quant" in line for line in diff.splitlines()) == 2
    assert sum(line.startswith("-") and 'getattr(self, "0")(' in line for line in diff.splitlines()) == 1


def test_networkx_attributes(prepared):
    _, qm = prepared
    graph = qzo_fx.to_networkx(qm)
    assert graph.number_of_nodes() == len(qm.graph.nodes)
    fq = [n for n, d in graph.nodes(data=True) if d["target"] == "qzo.fake_quant.default"]
    assert len(fq) == 2 and graph.nodes[fq[0]]["qzo"].startswith("quantizer=")
    assert graph.nodes["linear"]["op"] == "call_function" and "W2" in graph.nodes["linear"]["qzo"]


def test_svg_missing_graphviz_is_clear(prepared, monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(qzo_fx.QzoError, match="Graphviz"):
        qzo_fx.draw_svg(prepared[1], tmp_path / "g.svg")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed")
def test_svg_drawn(prepared, tmp_path):
    path = qzo_fx.draw_svg(prepared[1], tmp_path / "g.svg")
    assert "<svg" in path.read_text()


def test_cli_inspect(capsys, tmp_path):
    code = main(["inspect", "tests.inspect.test_inspect:make_model", "--weight-bits", "4",
                 "--svg", str(tmp_path / "g.svg")])
    captured = capsys.readouterr()
    assert code == 0
    assert "2 quantizers" in captured.out and "+++ after" in captured.out
    assert (tmp_path / "g.svg").exists() or (tmp_path / "g.dot").read_text().startswith("digraph")


def test_cli_bad_factory_is_clean_error(capsys):
    assert main(["inspect", "no_such_module:f"]) == 2
    assert "cannot load the factory" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "qzo_fx.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout


def test_cli_export_factory_and_saved_model(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", "tests.inspect.test_inspect:make_model", "--weight-bits", "4", "--out", str(out),
                 "--target", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "opset 21" in printed and "DequantizeLinear" in printed and "parity OK" in printed
    model, inputs = make_model()
    saved = tmp_path / "qm.pt"
    torch.save(qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8)), saved)
    assert main(["export", str(saved), "--input-shape", "2,6", "--out", str(out)]) == 0
    assert main(["export", str(saved), "--out", str(out)]) == 2


def test_cli_export_trains_with_the_targets_numerics(capsys, tmp_path):
    # TensorRT takes no zero points: the CLI prepares symmetric activations for it.
    for target in ("tensorrt", "portable"):
        assert main(["export", "tests.inspect.test_inspect:make_model", "--activation-bits", "8", "--target", target,
                     "--out", str(tmp_path / f"{target}.onnx")]) == 0, capsys.readouterr()
        assert "parity OK" in capsys.readouterr().out


def test_cli_bench_quick_smoke(tmp_path):
    """`qzo-fx bench NAME --quick`: the quick FOGZO-vs-STE comparison runs end to end."""
    command = [sys.executable, "-m", "qzo_fx.cli", "bench", "fogzo_vs_ste", "--quick", "--out", str(tmp_path)]
    out = subprocess.run(command,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Same iterations" in out.stdout and "MLP digits" in out.stdout
    assert (tmp_path / "fogzo_vs_ste.json").exists()


def test_cli_bench_unknown_name_is_refused():
    out = subprocess.run([sys.executable, "-m", "qzo_fx.cli", "bench", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr
