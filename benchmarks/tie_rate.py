"""How often ONNX Runtime's default session picks another activation code than the eval model.

    python benchmarks/tie_rate.py

Nine CNNs at random init (torchvision and timm ResNet-18, timm MobileNetV3-large, RegNetY-002 and
EfficientNet-B0, a small Hugging Face ResNet, torchvision ShuffleNetV2, MobileNetV2 and MNASNet),
W8A8 defaults, three STE steps with Adam so that BatchNorm
statistics and weights move, then export and ``verify_onnx`` on six batches of eight 64 x 64
images. A *tie* is a code where torch's value lies within float precision of a rounding boundary
and ORT's kernels land on the other side (``verify_onnx`` follows them); fewer ties means fewer
random-init models whose outputs move by more than a step in ORT. Prints ties per model and per
million codes.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo's torchvision shim

import qzo_fx  # noqa: E402


def _models():
    from tests.zoo.models import torchvision_shim

    torchvision_shim()
    import timm
    import torchvision
    import transformers

    torch.manual_seed(0)
    small = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_labels=10)
    return {"tv/resnet18": torchvision.models.resnet18(num_classes=10),
            "timm/resnet18": timm.create_model("resnet18", num_classes=10),
            "timm/mobilenetv3_large_100": timm.create_model("mobilenetv3_large_100", num_classes=10),
            "timm/regnety_002": timm.create_model("regnety_002", num_classes=10),
            "hf/resnet": transformers.ResNetForImageClassification(small),
            "timm/efficientnet_b0": timm.create_model("efficientnet_b0", num_classes=10),
            "tv/shufflenet_v2_x0_5": torchvision.models.shufflenet_v2_x0_5(num_classes=10),
            "tv/mobilenet_v2": torchvision.models.mobilenet_v2(num_classes=10),
            "tv/mnasnet0_5": torchvision.models.mnasnet0_5(num_classes=10)}


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    total_ties = total_codes = 0
    with TemporaryDirectory() as tmp:
        for name, model in _models().items():
            x = torch.randn(4, 3, 64, 64)
            qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,))
            optimizer = torch.optim.Adam(qm.parameters(), 1e-3)
            step = qzo_fx.train_step(qm.train(), lambda m, b: _logits(m(b)).square().mean(), qzo_fx.STE())
            for _ in range(3):
                optimizer.zero_grad()
                step(torch.randn(4, 3, 64, 64))
                optimizer.step()
            path = Path(tmp) / f"{name.replace('/', '_')}.onnx"
            qzo_fx.export_onnx(qm.eval(), (x,), path)
            ties = codes = 0
            for seed in range(6):
                probe = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
                report = qzo_fx.verify_onnx(qm, path, (probe,))
                ties, codes = ties + report.ties, codes + report.codes
            total_ties, total_codes = total_ties + ties, total_codes + codes
            print(f"{name}: {ties} ties in {codes} codes", flush=True)
    print(f"total: {total_ties} ties in {total_codes} codes ({total_ties / total_codes * 1e6:.2f} per million)")


if __name__ == "__main__":
    main()
