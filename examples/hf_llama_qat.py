"""Quantization-aware pre-training of a small LLaMA from random init, then int4 generation in ONNX Runtime.

    python examples/hf_llama_qat.py            # about 4 minutes on 2 CPU cores (400 steps)
    python examples/hf_llama_qat.py --steps 40 # a quick look

1. A character-level ``LlamaForCausalLM`` (random init) on CPython's ``pydoc_data.topics`` text,
   which ships with Python: nothing is downloaded.
2. ``qzo_fx.prepare`` with 4-bit per-group (32) weights; the model is captured with ``labels`` so it
   computes its own loss, as Hugging Face models do.
3. ``QzoTrainer`` (a ``transformers.Trainer``) trains it: the first 70% of the steps with the
   STE, the rest with FOGZO (the paper's "70% STE + 30% FOGZO").
4. ``qzo_fx.export_causal_lm`` writes an int4 ONNX file with a KV cache (MatMulNBits), and
   ``qzo_fx.generate`` decodes greedily in ONNX Runtime; the tokens are checked against a greedy
   decode of the prepared model in torch.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import transformers

import qzo_fx
from qzo_fx.data import load_text
from qzo_fx.integrations.transformers import QzoTrainer


class Windows(torch.utils.data.Dataset):
    """Fixed-length windows of the character stream (input and label are the same ids: the
    model shifts them itself)."""

    def __init__(self, codes: torch.Tensor, length: int) -> None:
        self.codes, self.length = codes, length

    def __len__(self) -> int:
        return (len(self.codes) - 1) // self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.codes[i * self.length:(i + 1) * self.length]
        return {"input_ids": window, "labels": window}


def perplexity(qm: torch.nn.Module, data: Windows, batches: int = 8, batch_size: int = 16) -> float:
    qm.eval()
    losses = []
    with torch.no_grad():
        for b in range(batches):
            ids = torch.stack([data[b * batch_size + j]["input_ids"] for j in range(batch_size)])
            losses.append(float(qm(ids, labels=ids).loss))
    return math.exp(sum(losses) / len(losses))


def torch_greedy(qm: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the prepared model itself (no cache: the whole sequence each step)."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = qm(ids, labels=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="demo_out/llama_int4")
    args = parser.parse_args()
    torch.manual_seed(0)

    codes, vocab = load_text()
    cut = int(0.95 * len(codes))
    train, test = Windows(codes[:cut], 64), Windows(codes[cut:], 64)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config)
    example = torch.stack([train[0]["input_ids"], train[1]["input_ids"]])
    weights = qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=32)
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight=weights), example_inputs=(example,),
                        example_kwargs={"labels": example})
    print(f"prepared: {len(qzo_fx.list_quantizers(qm))} int4 weight quantizers; "
          f"test perplexity at random init {perplexity(qm, test):.1f}")

    training = transformers.TrainingArguments(
        args.out, use_cpu=True, report_to=[], max_steps=args.steps, per_device_train_batch_size=16,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=args.steps // 10,
        logging_steps=max(args.steps // 10, 1),
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    estimator = qzo_fx.FOGZO(total_steps=args.steps, ste_fraction=0.7, beta_min=0.9999, seed=0)
    trainer = QzoTrainer(model=qm, args=training, train_dataset=train, estimator=estimator)
    start = time.perf_counter()
    trainer.train()
    stats = trainer.qzo_step.stats
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s "
          f"({stats.fwd_equivalents} forward-pass equivalents, final beta {stats.beta}); "
          f"test perplexity {perplexity(qm, test):.2f}")

    path = Path(args.out) / "model.onnx"
    result = qzo_fx.export_causal_lm(qm, model, path)
    print(f"ONNX: {path} ({result.size_bytes / 2**20:.2f} MiB), {result.op_types.get('MatMulNBits', 0)} MatMulNBits")
    prompt_text = b"The return statement"
    prompt = torch.tensor([list(prompt_text)])
    generated = qzo_fx.generate(str(path), prompt, max_new_tokens=48)
    reference = torch_greedy(qm, prompt, 48).numpy()
    same = bool((generated.tokens == reference).all())
    text = bytes(int(t) for t in generated.tokens[0]).decode("ascii", "replace")
    print(f"ONNX Runtime greedy: {prompt_text.decode()!s}{text!r}")
    print(f"{generated.tokens_per_second:.0f} tokens/s ({generated.decode_tokens_per_second:.0f} while decoding); "
          f"identical to torch's greedy decode of the prepared model: {same}")
    if not same:
        raise SystemExit("ONNX Runtime and torch generated different tokens")


if __name__ == "__main__":
    main()
