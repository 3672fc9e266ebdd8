"""What one zoo entry is: a model as a user builds it, and the inputs a user feeds it.

A :class:`Case` holds the model (random init, in the mode its constructor leaves it, as a
user gets it) and input *specs* with symbolic sizes ``"B"`` (batch) and ``"S"`` (sequence
length of token inputs), so that the pipeline can draw the example batch, other batch sizes,
other sequence lengths and a small dataset from the same description.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

Size = Union[int, str]


@functools.cache
def torchvision_shim() -> None:
    """Register the two compiled-op schemas torchvision 0.28 expects beside the CPU torch 2.13
    (test support only: compiled ops such as nms stay unavailable)."""
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        torchvision_shim.lib = lib  # keep the registration alive
    except RuntimeError:
        pass  # already defined in this process


def _shape(shape: tuple[Size, ...], batch: int, seq: Optional[int]) -> tuple[int, ...]:
    sizes = {"B": batch, "S": seq}
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


@dataclass(frozen=True)
class Floats:
    """A float tensor drawn from N(0, scale^2)."""

    shape: tuple[Size, ...]
    scale: float = 1.0

    def draw(self, batch: int, seq: Optional[int], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(_shape(self.shape, batch, seq), generator=gen) * self.scale


@dataclass(frozen=True)
class Tokens:
    """Integer token ids in [0, vocab)."""

    vocab: int
    shape: tuple[Size, ...] = ("B", "S")

    def draw(self, batch: int, seq: Optional[int], gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.vocab, _shape(self.shape, batch, seq), generator=gen)


@dataclass(frozen=True)
class Mask:
    """An attention mask as a tokenizer pads a batch: ones, and the last row's final quarter
    zero (right padding) when the batch has more than one row."""

    shape: tuple[Size, ...] = ("B", "S")

    def draw(self, batch: int, seq: Optional[int], gen: torch.Generator) -> torch.Tensor:
        mask = torch.ones(_shape(self.shape, batch, seq), dtype=torch.long)
        if batch > 1:
            mask[-1, mask.shape[1] - max(mask.shape[1] // 4, 1):] = 0
        return mask


Spec = Union[Floats, Tokens, Mask]


@dataclass
class Case:
    """A model and its inputs.

    Args:
        model: the user's model, as constructed (random init).
        args: positional input specs.
        kwargs: keyword tensor input specs.
        static: non-tensor keyword arguments of every call (e.g. ``scale=3.0``).
        batch: example batch size.
        seq: example sequence length of token inputs (``"S"``); None when there is none.
        random_ops: the forward draws random numbers in train mode other than through Dropout
            modules or drop-path modules (e.g. ``torch.rand`` or ``F.dropout`` with a config value).
    """

    model: nn.Module
    args: tuple[Spec, ...] = ()
    kwargs: dict[str, Spec] = field(default_factory=dict)
    static: dict[str, Any] = field(default_factory=dict)
    batch: int = 2
    seq: Optional[int] = None
    random_ops: bool = False

    def inputs(self, batch: Optional[int] = None, seq: Optional[int] = None, seed: int = 0):
        """``(args, kwargs)`` for one call: tensors drawn from the specs, then the static values."""
        gen = torch.Generator().manual_seed(seed)
        batch, seq = batch or self.batch, seq or self.seq
        args = tuple(spec.draw(batch, seq, gen) for spec in self.args)
        kwargs = {name: spec.draw(batch, seq, gen) for name, spec in self.kwargs.items()}
        return args, {**kwargs, **self.static}

    @property
    def has_sequence(self) -> bool:
        return self.seq is not None


@dataclass(frozen=True)
class Entry:
    """A zoo row: the family it is counted in and the factory that builds its case."""

    family: str
    build: Callable[[], Case]
    needs: Optional[str] = None  # the optional package it needs (timm, torchvision, transformers)


# ----------------------------------------------------------------- which models are stochastic
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Hugging Face config fields that transformers applies functionally in train mode in some
# architectures (F.dropout with the config value, attention-probability dropout, layer drop,
# SpecAugment masking). Head-specific fields (classifier_dropout, summary_*) are left out: when
# the head exists its dropout is an nn.Dropout module, found as a module.
FUNCTIONAL_RANDOM_FIELDS = ("dropout", "dropout_rate", "activation_dropout", "hidden_dropout", "resid_pdrop",
                            "embd_pdrop", "attention_dropout", "attention_probs_dropout_prob", "attn_pdrop",
                            "layerdrop", "encoder_layerdrop", "decoder_layerdrop")
SPEC_AUGMENT_FIELDS = ("mask_time_prob", "mask_feature_prob")


def stochastic_reasons(model: nn.Module, case: Case) -> list[str]:
    """Why ``model`` draws random numbers in train mode (empty: deterministic by this rule).

    The rule: a Dropout-family module with ``p > 0``; a module with a positive ``drop_prob``
    (timm DropPath/DropBlock) or torchvision ``StochasticDepth`` with ``p > 0``; a positive
    Hugging Face config field that transformers applies functionally (attention dropout, layer
    drop, SpecAugment masking when ``apply_spec_augment``); or a case that declares random ops
    in its forward. The pipeline also runs the float model twice in
    train mode under different seeds and counts it stochastic when the outputs differ.
    """
    reasons = []
    for name, module in model.named_modules():
        p = getattr(module, "p", None)
        if isinstance(module, DROPOUT_TYPES) and p:
            reasons.append(f"{name or 'root'}: {type(module).__name__}(p={p})")
        elif type(module).__name__ == "StochasticDepth" and p:
            reasons.append(f"{name}: StochasticDepth(p={p})")
        elif isinstance(getattr(module, "drop_prob", None), float) and module.drop_prob > 0:
            reasons.append(f"{name}: {type(module).__name__}(drop_prob={module.drop_prob})")
    config = getattr(model, "config", None)
    if config is not None:
        augment = SPEC_AUGMENT_FIELDS if getattr(config, "apply_spec_augment", False) else ()
        fields = FUNCTIONAL_RANDOM_FIELDS + augment
        reasons += [f"config.{key}={getattr(config, key)}" for key in fields if (getattr(config, key, 0) or 0) > 0]
    if case.random_ops:
        reasons.append("the forward draws random numbers in train mode")
    return reasons
