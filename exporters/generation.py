"""Greedy generation in ONNX Runtime from a decoder file with a KV cache.

The file is one written by :func:`qzo_fx.exporters.export_causal_lm` (or any file with the same
inputs and outputs: ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key|value`` in;
``logits``, ``present.{i}.key|value`` out). The first step runs the whole prompt with an empty
cache; each later step runs one token and the cache the step before returned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from qzo_fx.errors import ExportError
from qzo_fx.exporters.runtime import onnx_session

__all__ = ["generate", "Generation"]


@dataclass
class Generation:
    """Greedy tokens and how long they took.

    ``tokens``: ``[batch, new tokens]``. ``prompt_seconds``: the first step (the prompt and the
    first new token). ``decode_seconds``: every later step (one token each, with the cache)."""

    tokens: np.ndarray
    prompt_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second over the whole generation, prompt included."""
        return self.tokens.size / max(self.prompt_seconds + self.decode_seconds, 1e-12)

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second of the decode steps (one token with the cache each)."""
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_seconds if steps and self.decode_seconds else 0.0


def _cache_inputs(session) -> list[Any]:
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not past or {"input_ids", "attention_mask"} - {i.name for i in session.get_inputs()}:
        raise ExportError("generate() needs a decoder file with input_ids, attention_mask and "
                          "past_key_values.{i}.key/value inputs: export it with qzo_fx.exporters.export_causal_lm.")
    return past


def generate(model: Union[str, Path, Any], input_ids: Any, max_new_tokens: int, *,
             eos_token_id: Optional[int] = None, target: str = "cpu") -> Generation:
    """Greedy decoding with the KV cache in an ONNX Runtime default session.

    Args:
        model: the ``.onnx`` path, or an open ``onnxruntime.InferenceSession``.
        input_ids: the prompt, ``[batch, length]`` integers (numpy or torch).
        max_new_tokens: how many tokens to generate.
        eos_token_id: stop once every row has produced it.
        target: the provider for a path, as :func:`qzo_fx.onnx_session` takes it.

    Example:
        >>> out = generate("llm/model.onnx", [[1, 2, 3]], max_new_tokens=8)   # doctest: +SKIP
        >>> out.tokens.shape, round(out.tokens_per_second)                    # doctest: +SKIP
        ((1, 8), 412)
    """
    session = onnx_session(model, target) if isinstance(model, (str, Path)) else model
    past_inputs = _cache_inputs(session)
    ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids, dtype=np.int64)
    batch = ids.shape[0]
    feeds = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    outputs = [o.name for o in session.get_outputs()]
    presents = [name.replace("past_key_values.", "present.") for name in feeds]
    tokens, total, seconds = [], ids.shape[1], []
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        values = dict(zip(outputs, session.run(None, {"input_ids": ids, "attention_mask": np.ones(
            (batch, total), np.int64), **feeds})))
        seconds.append(time.perf_counter() - start)
        ids = values["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(ids[:, 0])
        feeds = {name: values[present] for name, present in zip(feeds, presents)}
        total += 1
        if eos_token_id is not None and (ids == eos_token_id).all():
            break
    return Generation(np.stack(tokens, 1), seconds[0], float(sum(seconds[1:])))
