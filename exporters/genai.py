"""``genai_config.json`` for onnxruntime-genai, beside a decoder exported with a KV cache.

onnxruntime-genai runs decoder LLMs from a folder holding the ONNX file and this config, which
names the file, its cache inputs and outputs and the model's sizes; its generator then runs the
same greedy loop as :func:`qzo_fx.exporters.generate`, in C++.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from qzo_fx.exporters.causal_lm import cache_layout

__all__ = ["write_genai_config", "genai_config"]


def genai_config(config: Any, filename: str, max_length: Optional[int] = None) -> dict:
    """The onnxruntime-genai configuration of a decoder file written by ``export_causal_lm``."""
    layout = cache_layout(config)
    context = int(max_length or getattr(config, "max_position_embeddings", 2048))
    eos = getattr(config, "eos_token_id", None)
    return {
        "model": {
            "type": getattr(config, "model_type", "llama"),
            "vocab_size": layout.vocab,
            "context_length": context,
            "bos_token_id": getattr(config, "bos_token_id", None) or 0,
            "eos_token_id": eos if eos is not None else -1,
            "pad_token_id": getattr(config, "pad_token_id", None) or 0,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": layout.kv_heads,
                "num_hidden_layers": layout.layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "num_return_sequences": 1, "diversity_penalty": 0.0},
    }


def write_genai_config(config: Any, model_path: Union[str, Path], max_length: Optional[int] = None) -> Path:
    """Write ``genai_config.json`` beside ``model_path`` for the model's Hugging Face ``config``.

    Example:
        >>> write_genai_config(model.config, "llm/model.onnx")                # doctest: +SKIP
        >>> import onnxruntime_genai as og; og.Model("llm")                    # doctest: +SKIP
    """
    model_path = Path(model_path)
    target = model_path.parent / "genai_config.json"
    target.write_text(json.dumps(genai_config(config, model_path.name, max_length), indent=2))
    return target
