"""Low-bit inference in ONNX Runtime: int4 LLaMA with a KV cache and W8A8 CNN/ViT, against ORT's
own quantizer, ORT fp32 and torch, measured in one run.

    python benchmarks/onnx_inference.py [--quick] [--only llm|vision]

LLM: a LLaMA (4 layers, hidden 512, vocabulary 2048) at random init, weight-only int4 per group
of 32. Files, all with the same KV-cache inputs and outputs: fp32 (the float model), ORT's
``MatMulNBitsQuantizer`` (block 32, symmetric, 4 bits) applied to that fp32 file, and qzo_fx's
``export_causal_lm`` of the prepared model (MatMulNBits + GatherBlockQuantized). Latency at the
prompt shape (128 tokens, empty cache) and the decode shape (one token, 128 cached), greedy
generation tokens/s, file sizes, parity in ORT and OpenVINO, greedy tokens against torch.

Vision: torchvision ResNet-18 and timm DeiT-tiny (224 x 224) W8A8 (qzo_fx defaults) against the
fp32 file in ORT and torch eager, at batch 1 and 8.

Every session and torch run on one thread (2 shared cores here; one thread each keeps ORT's
spinning pool from taking torch's core). Ratios are medians over rounds of per-round ratios
(candidates interleaved, so drift cancels). Targets (issue 16): qzo_fx int4 <= 1.0x the ORT
quantizer's latency at both shapes; decode faster than fp32; file no larger than the ORT
quantizer's; parity <= 1 step in ORT and OpenVINO; greedy tokens identical to torch.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zoo's torchvision shim

from timing import interleaved_rounds, medians, paired_ratio  # noqa: E402

import qzo_fx  # noqa: E402
from qzo_fx.exporters import export_causal_lm, generate  # noqa: E402
from qzo_fx.exporters.onnx_export import strip_debug_info  # noqa: E402
from qzo_fx.exporters.openvino_runtime import OpenVinoSession  # noqa: E402

BLOCK = 5  # calls per turn; the first of each turn is dropped
PROMPT, NEW_TOKENS = 128, 32


def _session(path):
    return qzo_fx.onnx_session(path, "cpu", threads=1)


def _llama():
    from tests.zoo.models import torchvision_shim

    torchvision_shim()
    import transformers

    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ort_quantizer(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)),
                                     algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=4))
    # The quantizer sets the root logger to INFO and logs a line per node: keep its own logger quiet.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer turns the root logger to INFO


def _feeds(session, ids: np.ndarray, past: int, values=None) -> dict:
    """input_ids, a mask over past + new tokens and the cache (zeros, or a run's presents)."""
    feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], past + ids.shape[1]), np.int64)}
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values."):
            present = meta.name.replace("past_key_values.", "present.")
            feeds[meta.name] = values[present] if values else np.zeros((ids.shape[0], meta.shape[1], 0, meta.shape[3]),
                                                                       np.float32)
    return feeds


def _decode_feeds(session, prompt: np.ndarray) -> dict:
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, _feeds(session, prompt, 0))))
    return _feeds(session, prompt[:, -1:], prompt.shape[1], values)


def _torch_cached(model, prompt: torch.Tensor):
    """The float model in torch eager with its own cache: prompt and one-token decode calls."""
    import inspect

    argument = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values

    def decode():
        with torch.no_grad():
            model(prompt[:, -1:], use_cache=True, **{argument: cache})
        cache.crop(-1)  # drop the new entry: back to the prompt's 128 for the next call

    def full():
        with torch.no_grad():
            model(prompt, use_cache=True)
    return full, decode


def _steps(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() / 127))


def _torch_greedy(qm, prompt: torch.Tensor, steps: int) -> np.ndarray:
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, qm(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:].numpy()


def run_llm(rounds: int, out: Path) -> None:
    model = _llama()
    cfg = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=32))
    qm = qzo_fx.prepare(model, cfg, example_inputs=(torch.randint(0, 2048, (2, 16)),)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = {"fp32": export_causal_lm(None, model, out / "fp32.onnx").path}
        _ort_quantizer(files["fp32"], out / "ort_int4.onnx")
        files["ORT MatMulNBitsQuantizer"] = out / "ort_int4.onnx"
        files["qzo_fx int4"] = export_causal_lm(qm, model, out / "qzo_int4.onnx").path
    sizes = {name: path.stat().st_size / 2**20 for name, path in files.items()}
    print("\n== int4 LLaMA (4 layers, hidden 512, vocab 2048, group 32), one thread each")
    print("   file sizes: " + ", ".join(f"{n} {s:.1f} MiB" for n, s in sizes.items()))
    prompt = torch.randint(0, 2048, (1, PROMPT))
    sessions = {name: _session(path) for name, path in files.items()}
    torch_full, torch_decode = _torch_cached(model, prompt)
    shapes = {"prompt (128 tokens)": ({n: _feeds(s, prompt.numpy(), 0) for n, s in sessions.items()}, torch_full),
              "decode (1 token, 128 cached)": ({n: _decode_feeds(s, prompt.numpy()) for n, s in sessions.items()},
                                               torch_decode)}
    for shape, (feeds, torch_fn) in shapes.items():
        fns = {n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}
        fns["torch fp32 eager"] = torch_fn
        samples = interleaved_rounds(fns, rounds, warmup=2, block=BLOCK)
        ms = {n: t * 1e3 for n, t in medians(samples).items()}
        print(f"   {shape}: " + ", ".join(f"{n} {t:.2f} ms" for n, t in ms.items()))
        print("      qzo_fx int4 / ORT quantizer {:.2f}x, / ORT fp32 {:.2f}x, / torch fp32 {:.2f}x".format(
            *(paired_ratio(samples, "qzo_fx int4", base) for base in
              ("ORT MatMulNBitsQuantizer", "fp32", "torch fp32 eager"))))
    _llm_quality(qm, files, sessions, prompt)


def _llm_quality(qm, files: dict, sessions: dict, prompt: torch.Tensor) -> None:
    for name in ("qzo_fx int4", "ORT MatMulNBitsQuantizer", "fp32"):
        gen = generate(sessions[name], prompt, NEW_TOKENS)
        print(f"   generation {name}: {gen.tokens_per_second:.1f} tokens/s overall, "
              f"{gen.decode_tokens_per_second:.1f} tokens/s decoding ({PROMPT}-token prompt, {NEW_TOKENS} new)")
    ours = generate(sessions["qzo_fx int4"], prompt, NEW_TOKENS).tokens
    same = np.array_equal(ours, _torch_greedy(qm, prompt, NEW_TOKENS))
    print(f"   greedy tokens identical to torch on the prepared model: {same}")
    probe = torch.randint(0, 2048, (2, 48))
    with torch.no_grad():
        expected = qm(probe).logits.numpy()
    for runtime, session in (("ORT", sessions["qzo_fx int4"]), ("OpenVINO", OpenVinoSession(files["qzo_fx int4"]))):
        logits = session.run(["logits"], _feeds(session, probe.numpy(), 0))[0]
        print(f"   parity of the qzo_fx file, logits vs the prepared model, {runtime}: "
              f"{_steps(logits, expected):.4f} steps")


def _vision_models():
    from tests.zoo.models import torchvision_shim

    torchvision_shim()
    import timm
    import torchvision

    torch.manual_seed(0)
    return {"ResNet-18": torchvision.models.resnet18(weights=None).eval(),
            "DeiT-tiny": timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()}


def _fp32_file(model, x, path: Path) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    proto = program.model_proto
    strip_debug_info(proto)  # the same treatment as the quantized files: a fair size ratio
    onnx.save(proto, str(path))
    return path


def _runner(session, x: torch.Tensor):
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def run_vision(rounds: int, out: Path) -> None:
    for name, model in _vision_models().items():
        calib = torch.randn(8, 3, 224, 224)
        qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8), example_inputs=(calib,)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w8a8 = qzo_fx.export_onnx(qm, (calib[:2],), out / f"{name}_w8a8.onnx")
        fp32 = _fp32_file(model, calib[:2], out / f"{name}_fp32.onnx")
        print(f"\n== {name} 224x224 W8A8: files fp32 {fp32.stat().st_size / 2**20:.1f} MiB, "
              f"W8A8 {w8a8.size_bytes / 2**20:.1f} MiB")
        s8, s32 = _session(w8a8.path), _session(fp32)
        report = qzo_fx.verify_onnx(qm, w8a8.path, (calib[:4],), target="cpu")
        openvino = qzo_fx.verify_onnx(qm, w8a8.path, (calib[:4],), runtime="openvino")
        verdict = {True: "OK", False: "FAILED"}
        print(f"   parity (ties followed): ORT {report.outputs[0].steps:.3f} steps ({verdict[report.ok]}), "
              f"OpenVINO {openvino.outputs[0].steps:.3f} steps ({verdict[openvino.ok]})")
        for batch in (1, 8):
            x = calib[:batch]
            fns = {"ORT W8A8": _runner(s8, x), "ORT fp32": _runner(s32, x),
                   "torch fp32 eager": lambda m=model, x=x: m(x)}
            with torch.no_grad():
                samples = interleaved_rounds(fns, rounds, warmup=2, block=BLOCK)
            ms = {n: t * 1e3 for n, t in medians(samples).items()}
            print(f"   batch {batch}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in ms.items()) +
                  f"; W8A8 / ORT fp32 {paired_ratio(samples, 'ORT W8A8', 'ORT fp32'):.2f}x, "
                  f"/ torch fp32 {paired_ratio(samples, 'ORT W8A8', 'torch fp32 eager'):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("llm", "vision"))
    args = parser.parse_args()
    rounds = 5 if args.quick else 20
    torch.set_num_threads(1)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, one thread each; median of {rounds} "
          f"interleaved rounds of {BLOCK} calls (first dropped)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "llm"):
            run_llm(rounds, Path(tmp))
        if args.only in (None, "vision"):
            run_vision(rounds, Path(tmp))


if __name__ == "__main__":
    main()
