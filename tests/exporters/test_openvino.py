"""A second runtime: exported CNN, ViT and LLM files are right in OpenVINO's CPU runtime too."""
from __future__ import annotations

import pytest
import torch

import qzo_fx
from qzo_fx.models import SmallCNN, TinyLlama, TinyViT

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("openvino")

W8A8 = qzo_fx.QuantConfig(weight_bits=8, activation_bits=8)
INT4 = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=32))
IMAGES, TOKENS = (lambda n: torch.randn(n, 1, 28, 28)), (lambda n: torch.randint(0, 128, (n, 16)))


@pytest.mark.parametrize("name,factory,data,cfg,capture", [
    ("cnn-w8a8", SmallCNN, IMAGES, W8A8, "auto"),
    ("vit-w8a8", TinyViT, IMAGES, W8A8, "auto"),
    ("llama-w8a8", TinyLlama, TOKENS, W8A8, "export"),
    ("llama-int4", TinyLlama, TOKENS, INT4, "export"),
])
@pytest.mark.parametrize("weight_format,target", [("qdq", "portable"), ("auto", "cpu")])
def test_openvino_and_onnxruntime_both_match_the_model(name, factory, data, cfg, capture, weight_format, target,
                                                       tmp_path):
    torch.manual_seed(0)
    qm = qzo_fx.prepare(factory(), cfg, example_inputs=(data(4),), capture=capture)
    result = qzo_fx.export_onnx(qm, (data(4),), tmp_path / "m.onnx", target=target, weight_format=weight_format)
    probe = (data(3),)
    openvino = qzo_fx.verify_onnx(qm, result.path, probe, runtime="openvino")
    assert openvino.ok and openvino.provider == "OpenVINO CPU" and openvino.outputs[0].steps <= 0.01, str(openvino)
    assert qzo_fx.verify_onnx(qm, result.path, probe).ok


def test_unknown_runtime_is_refused(tmp_path):
    qm = qzo_fx.prepare(SmallCNN(), W8A8, example_inputs=(IMAGES(2),))
    result = qzo_fx.export_onnx(qm, (IMAGES(2),), tmp_path / "m.onnx")
    with pytest.raises(qzo_fx.ExportError, match="runtime"):
        qzo_fx.verify_onnx(qm, result.path, (IMAGES(2),), runtime="tvm")
