"""What folding BatchNorm into the conv's scales buys in ONNX Runtime: the same W8A8 model exported
with its BatchNormalization kept (prepared without the eval-graph fold and exported with
``fold_batchnorm=False``: the file the release before wrote for these models, where ORT runs the
convs in float) and with the defaults (folded into the scales and the int32 bias).

    python benchmarks/batchnorm_folding.py [--rounds 10]

Models at random init, 4 x 3 x 128 x 128, W8A8 defaults: Hugging Face ResNet-50 (torch.export
capture: ``aten.batch_norm``), timm RegNetY-002 and EfficientNet-B0 (``BatchNormAct2d``, traced
into: ``F.batch_norm``). One ORT thread; rounds interleaved, the ratio is the median of per-round
ratios. Parity of the folded file is printed too (verify_onnx, default session).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo's torchvision shim

from timing import interleaved_rounds, medians, paired_ratio  # noqa: E402

import qzo_fx  # noqa: E402
import qzo_fx.capture.pipeline as pipeline  # noqa: E402


def _models() -> dict:
    from tests.zoo.models import torchvision_shim

    torchvision_shim()
    import timm
    import transformers

    torch.manual_seed(0)
    return {"hf/resnet50": transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=10)),
            "timm/regnety_002": timm.create_model("regnety_002", num_classes=10),
            "timm/efficientnet_b0": timm.create_model("efficientnet_b0", num_classes=10)}


def prepared_w8a8(model: torch.nn.Module, x: torch.Tensor, fold: bool) -> torch.nn.Module:
    """``model`` prepared W8A8 in eval mode, with or without the eval-graph fold of BatchNorm."""
    full = pipeline.PREPARE_PIPELINE
    if not fold:
        pipeline.PREPARE_PIPELINE = tuple(p for p in full if p.name != "fold_eval_batchnorm")
    try:
        return qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(x,)).eval()
    finally:
        pipeline.PREPARE_PIPELINE = full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    x = torch.randn(4, 3, 128, 128)
    feed_x = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in _models().items():
            runs, ops, prepared = {}, {}, {}
            for fold in (False, True):
                prepared[fold] = qm = prepared_w8a8(model, x, fold)
                path = Path(tmp) / f"{name.replace('/', '_')}_{fold}.onnx"
                ops[fold] = qzo_fx.export_onnx(qm, x, path, fold_batchnorm=fold).op_types.get("BatchNormalization", 0)
                session = qzo_fx.onnx_session(path, "cpu", threads=1)
                feed = {session.get_inputs()[0].name: feed_x}
                runs["folded" if fold else "kept"] = lambda s=session, f=feed: s.run(None, f)
            samples = interleaved_rounds(runs, args.rounds, block=3)
            times = medians(samples)
            parity = qzo_fx.verify_onnx(prepared[True], path, (x,))
            print(f"{name}: BatchNormalization nodes {ops[False]} -> {ops[True]}; "
                  f"kept {times['kept'] * 1e3:.1f} ms, "
                  f"folded {times['folded'] * 1e3:.1f} ms, "
                  f"folded/kept {paired_ratio(samples, 'folded', 'kept'):.3f}; "
                  f"parity {'OK' if parity.ok else 'FAILED'} ({parity.raw_steps:.3f} steps)", flush=True)


if __name__ == "__main__":
    main()
