"""A Hugging Face causal LM exported with a KV cache: greedy generation in ONNX Runtime (and in
onnxruntime-genai where installed) gives torch's greedy tokens on the prepared model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qzo_fx
from qzo_fx.exporters import export_causal_lm, generate, write_genai_config

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")

INT4 = qzo_fx.QuantConfig(weight=qzo_fx.QuantSpec(bits=4, granularity="per_group", group_size=32))


@pytest.fixture(scope="module")
def llama():
    from tests.zoo.models import torchvision_shim

    torchvision_shim()  # transformers imports torchvision where it is installed
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    qm = qzo_fx.prepare(model, INT4, example_inputs=(torch.randint(0, 256, (2, 8)),))
    return model, qm


def _torch_greedy(qm, prompt: torch.Tensor, steps: int) -> np.ndarray:
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, qm.eval()(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:].numpy()


@pytest.mark.parametrize("weight_format", ["matmulnbits", "qdq"])
def test_kv_cache_file_generates_torch_greedy_tokens(llama, weight_format, tmp_path):
    model, qm = llama
    result = export_causal_lm(qm, model, tmp_path / "model.onnx", weight_format=weight_format)
    assert ("MatMulNBits" in result.op_types) == (weight_format == "matmulnbits")
    file = onnx.load(str(result.path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(file.graph.input) + list(file.graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.0.key"][:2] == ["batch", 2] and dims["logits"] == ["batch", "sequence", 256]
    prompt = torch.randint(0, 256, (2, 7))
    out = generate(result.path, prompt, max_new_tokens=10)
    np.testing.assert_array_equal(out.tokens, _torch_greedy(qm, prompt, 10))
    assert out.tokens.shape == (2, 10) and out.tokens_per_second > 0 and out.decode_tokens_per_second > 0


def test_prompt_logits_match_the_prepared_model(llama, tmp_path):
    model, qm = llama
    result = export_causal_lm(qm, model, tmp_path / "model.onnx")
    session = qzo_fx.onnx_session(result.path)
    prompt = torch.randint(0, 256, (3, 9))
    empty = {i.name: np.zeros((3, 2, 0, 16), np.float32) for i in session.get_inputs() if i.name.startswith("past")}
    logits = session.run(["logits"], {"input_ids": prompt.numpy(), "attention_mask": np.ones((3, 9), np.int64),
                                      **empty})[0]
    with torch.no_grad():
        expected = qm.eval()(prompt).logits.numpy()
    assert np.abs(logits - expected).max() <= 0.01 * np.abs(expected).max() / 127


def test_onnxruntime_genai_loads_the_file_and_generates_the_same_tokens(llama, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    model, qm = llama
    result = export_causal_lm(qm, model, tmp_path / "llm" / "model.onnx")
    prompt = torch.randint(0, 256, (1, 6))
    write_genai_config(model.config, result.path, max_length=6 + 10)
    genai_model = og.Model(str(result.path.parent))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=16, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == _torch_greedy(qm, prompt, 10)[0].tolist()


def test_activation_quantized_lm_is_refused_with_the_way_out(llama, tmp_path):
    model, _ = llama
    qm = qzo_fx.prepare(model, qzo_fx.QuantConfig(weight_bits=8, activation_bits=8),
                        example_inputs=(torch.randint(0, 256, (2, 8)),))
    with pytest.raises(qzo_fx.ExportError, match="weight-only"):
        export_causal_lm(qm, model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
