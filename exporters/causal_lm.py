"""Hugging Face causal LMs to ONNX with a KV cache, weights as the prepared model holds them.

A prepared LM is captured for training (``use_cache=False``: every step sees the whole
sequence). Generation wants one forward per new token that reads and extends the key/value cache.
:func:`export_causal_lm` therefore exports the user's model class itself, in eval mode, with
every quantized ``nn.Linear`` and ``nn.Embedding`` replaced by a module that computes from the
prepared model's integer codes (MatMulNBits / GatherBlockQuantized for ONNX Runtime targets, Q/DQ
otherwise) and every other parameter taken from the prepared model, so the file computes what the
prepared model computes.

The file's inputs and outputs follow the layout optimum and onnxruntime-genai use:
``input_ids [batch, sequence]``, ``attention_mask [batch, total_sequence]``,
``past_key_values.{i}.key|value [batch, kv_heads, past_sequence, head_dim]`` in; ``logits
[batch, sequence, vocab]``, ``present.{i}.key|value [batch, kv_heads, total_sequence, head_dim]``
out. The first step passes an empty past (``past_sequence`` = 0).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from qzo_fx.capture.pipeline import quantizer_containers
from qzo_fx.errors import ExportError
from qzo_fx.exporters.gather_quantized import gather_layout
from qzo_fx.exporters.library_ops import translation_table
from qzo_fx.exporters.lower_weights import storage_codes
from qzo_fx.exporters.matmul_nbits import NBITS, nbits_block, nbits_layout
from qzo_fx.exporters.onnx_export import (
    ExportResult,
    check_and_save,
    name_dynamic_axes,
    op_histogram,
    pack_low_bit_weights,
    quiet_onnx_export,
    strip_debug_info,
    uses_ort_kernels,
)
from qzo_fx.passes.train.integer_codes import integer_codes
from qzo_fx.quant.quantizer import Quantizer

__all__ = ["export_causal_lm", "CacheLayout"]

_OPSET = 21


@dataclass(frozen=True)
class CacheLayout:
    """What a generation loop needs to know about a decoder file's cache."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(self.layers)
                                                 for k in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]


def cache_layout(config: Any) -> CacheLayout:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return CacheLayout(config.num_hidden_layers, kv_heads, head_dim, config.vocab_size)


class _QuantizedLinear(nn.Module):
    """``F.linear`` with the weight held as integer codes: MatMulNBits where ORT has the layout."""

    def __init__(self, codes, scale, zero, axis: int, block: int, bits: int, bias, ort_kernels: bool) -> None:
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.nbits = nbits_block(codes.shape[1], axis == 1, block) if ort_kernels and bits in NBITS else 0
        if self.nbits:
            packed, scales, zero_points, self.k, self.n = nbits_layout(codes, scale, zero, bits, self.nbits)
            self.register_buffer("packed", packed)
            self.register_buffer("scales", scales)
            self.register_buffer("zero_points", zero_points)
        else:
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero)
        self.axis, self.block, self.bits = axis, block, bits

    def forward(self, x):
        if self.nbits:
            return torch.ops.qzo.matmul_nbits(x, self.packed, self.scales, self.zero_points, self.bias, self.k,
                                              self.n, self.bits, self.nbits)
        weight = torch.ops.qzo.dequantize(self.codes, self.scale, self.zero_point, self.axis, self.block)
        return F.linear(x, weight, self.bias)


class _QuantizedEmbedding(nn.Module):
    """An embedding lookup that gathers integer codes (see :mod:`qzo_fx.exporters.gather_quantized`)."""

    def __init__(self, codes, scale, zero, axis: int, block: int, bits: int, ort_kernels: bool) -> None:
        super().__init__()
        layout = gather_layout(codes, scale, zero, axis, block, bits, ort_kernels)
        self.op: Any
        self.attributes: Any
        self.op, buffers, self.attributes = layout if layout else (None, {"codes": codes, "scale": scale,
                                                                           "zero_point": zero}, ())
        self.names = list(buffers)
        for name, value in buffers.items():
            self.register_buffer(name, value.contiguous())
        self.axis, self.block = axis, block

    def forward(self, ids):
        buffers = [getattr(self, name) for name in self.names]
        if self.op is not None:
            return self.op(ids, *buffers, *self.attributes)
        return F.embedding(ids, torch.ops.qzo.dequantize(*buffers, self.axis, self.block))


def _weight_quantizers(qm: nn.Module) -> dict[str, Quantizer]:
    found: dict[str, Quantizer] = {}
    for prefix, container in quantizer_containers(qm):
        for quantizer in container.children():
            if not isinstance(quantizer, Quantizer):
                continue
            if quantizer.role != "weight":
                raise ExportError(f"export_causal_lm: the activation quantizer of {quantizer.target!r} has no "
                                  "cache export; prepare the LM with weight-only quantization (activation=None).")
            found[f"{prefix}.{quantizer.target}" if prefix else quantizer.target] = quantizer
    return found


def _codes(qm: nn.Module, target: str, quantizer: Quantizer):
    codes = getattr(quantizer, "codes", None)
    if codes is None:
        codes = integer_codes(quantizer, qm.get_parameter(target))
    stored = storage_codes(quantizer, codes.detach())
    zero = torch.zeros_like(quantizer.zero_point) if quantizer.is_sign else quantizer.zero_point.detach()
    return stored, quantizer.scale.detach().clone(), zero.to(stored.dtype)


def quantized_copy(qm: nn.Module, model: nn.Module, ort_kernels: bool) -> tuple[nn.Module, dict]:
    """An eval copy of ``model`` with the prepared model's trained values and integer weights.
    Returns it and the packing info ``{module path: (bits, signed)}`` of its DequantizeLinear codes."""
    lm = copy.deepcopy(model).eval()
    trained = {k: v for k, v in qm.state_dict().items() if k in lm.state_dict()}
    missing = sorted(set(lm.state_dict()) - set(trained))
    coded = [name for name, q in qm.named_modules() if isinstance(q, Quantizer) and hasattr(q, "codes")]
    if missing and coded:
        raise ExportError(f"export_causal_lm: the prepared model holds its weights as integer codes "
                          f"(to_integer_codes; {len(coded)} quantizers): call qzo_fx.to_latent_weights(qm) first.")
    if missing:
        raise ExportError(f"export_causal_lm: {missing[:3]}... are not in the prepared model: pass the model "
                          "that qzo_fx.prepare() was given.")
    lm.load_state_dict(trained)
    packable = {}
    for target, quantizer in _weight_quantizers(qm).items():
        path, _, name = target.rpartition(".")
        module = lm.get_submodule(path)
        codes, scale, zero = _codes(qm, target, quantizer)
        args = (codes, scale, zero, max(quantizer.axis, 0), quantizer.group_size, quantizer.spec.bits)
        replacement: nn.Module
        if isinstance(module, nn.Linear) and name == "weight":
            replacement = _QuantizedLinear(*args, module.bias, ort_kernels)
        elif isinstance(module, nn.Embedding) and name == "weight":
            replacement = _QuantizedEmbedding(*args, ort_kernels)
        else:
            raise ExportError(f"export_causal_lm: {target!r} ({type(module).__name__}) is quantized; the cache "
                              "export takes quantized nn.Linear and nn.Embedding weights only.")
        owner, _, attribute = path.rpartition(".")
        setattr(lm.get_submodule(owner) if owner else lm, attribute, replacement)
        packable[path] = (quantizer.spec.bits, codes.dtype == torch.int8)
    return lm, packable


class _DecoderStep(nn.Module):
    """One decoder step on flat cache tensors (what the ONNX file runs)."""

    def __init__(self, lm: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.lm, self.layout = lm, layout
        self.cache_argument = "past_key_values" if "past_key_values" in inspect.signature(lm.forward).parameters \
            else "cache"

    def forward(self, input_ids, attention_mask, past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layout.layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.lm.config)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **{self.cache_argument: cache})
        present = getattr(out, "cache", None) or out.past_key_values
        flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


def _example(layout: CacheLayout, past: int = 3, length: int = 4) -> tuple:
    ids = torch.randint(0, layout.vocab, (2, length))
    mask = torch.ones(2, past + length, dtype=torch.long)
    caches = tuple(torch.zeros(2, layout.kv_heads, past, layout.head_dim) for _ in range(2 * layout.layers))
    return ids, mask, caches


def _shapes(layout: CacheLayout):
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    return ({0: batch, 1: sequence}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in range(2 * layout.layers)))


def export_causal_lm(qm: Optional[nn.Module], model: nn.Module, path: Union[str, Path], *, target: str = "auto",
                     weight_format: str = "auto") -> ExportResult:
    """Export a prepared Hugging Face causal LM with a KV cache for generation.

    Args:
        qm: the prepared model (weight-only quantized: ``QuantConfig(weight=..., activation=None)``),
            or None for the float model in the same layout (a baseline to compare with).
        model: the model that was passed to :func:`qzo_fx.prepare` (its class and config; its
            values are replaced by the prepared model's).
        path: where to write the ``.onnx`` file (a ``genai_config.json`` can be written beside it
            with :func:`qzo_fx.exporters.genai.write_genai_config`).
        target, weight_format: as for :func:`qzo_fx.export_onnx`.

    Example:
        >>> result = qzo_fx.export_causal_lm(qm, model, "llm/model.onnx")      # doctest: +SKIP
        >>> qzo_fx.generate("llm/model.onnx", prompt_ids, max_new_tokens=16)  # doctest: +SKIP
    """
    layout = cache_layout(model.config)
    if qm is None:
        lm, packable = copy.deepcopy(model).eval(), dict[str, Any]()
    else:
        lm, packable = quantized_copy(qm, model, uses_ort_kernels(weight_format, target))
    step = _DecoderStep(lm, layout).eval()
    onnx_model = _translate(step, layout)
    pack_low_bit_weights(onnx_model, packable)
    strip_debug_info(onnx_model)
    axes = name_dynamic_axes(onnx_model)
    saved: Path = check_and_save(onnx_model, path, "the exported decoder")
    return ExportResult(saved, _OPSET, saved.stat().st_size, op_histogram(onnx_model), True, [], axes)


def _translate(step: nn.Module, layout: CacheLayout) -> onnx.ModelProto:
    try:
        with torch.no_grad(), quiet_onnx_export():
            program = torch.onnx.export(step, _example(layout), dynamo=True, verbose=False, optimize=True,
                                        custom_translation_table=translation_table(), opset_version=_OPSET,
                                        dynamic_shapes=_shapes(layout), input_names=layout.input_names(),
                                        output_names=layout.output_names())
    except Exception as error:
        raise ExportError(f"torch.onnx could not export {type(step.lm).__name__} with a KV cache: "
                          f"{type(error).__name__}: {str(error)[:2000]}") from error
    if program is None:  # torch.onnx.export(dynamo=True) returns a program; None would be a torch change
        raise ExportError("torch.onnx.export returned no program for the decoder; this torch version is unsupported.")
    return program.model_proto
