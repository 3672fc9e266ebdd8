"""Quantization configuration: frozen, validated at construction.

A :class:`QuantSpec` says how one tensor is quantized; a :class:`QuantConfig` says which
tensors get which spec (global defaults, overrides by module type and by module-name
pattern, and a skip list). Only the annotate pass reads a config: everything downstream sees
resolved specs in ``node.meta``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, TypeVar, Union

import torch.nn as nn

from qzo_fx.errors import ConfigError

__all__ = ["QuantSpec", "QuantConfig", "STE_KINDS", "SIGN_ONLY_STE_KINDS", "TARGETS", "check_field_types",
           "known_keywords"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
STE_KINDS = ("identity", "clipped", "hardtanh", "tanh", "approxsign", "lsq")
# Surrogates defined for the sign function only (1-bit); see algorithms.md, STE table.
SIGN_ONLY_STE_KINDS = ("hardtanh", "tanh", "approxsign")
SCALE_INITS = ("maxabs", "mse", "percentile")
# Where the exported file will run: ONNX Runtime CPU, ONNX Runtime CUDA, TensorRT, or any runtime.
TARGETS = ("cpu", "cuda", "tensorrt", "portable")
# Targets whose W8A8 files may meet ONNX Runtime's CPU int8 kernels (see QuantConfig.target).
_REDUCED_RANGE_TARGETS = ("cpu", "portable")


_SCALAR_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}


def check_field_types(settings: object) -> None:
    """Raise :class:`ConfigError` for a dataclass field whose value is not of its annotated
    scalar type (``float``, ``int``, ``bool``, ``str``, or ``Optional`` of one): a string where a
    number belongs would otherwise fail later, deep inside a comparison."""
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        annotation = str(f.type).replace(" ", "")
        optional = annotation.startswith("Optional[") and annotation.endswith("]")
        core = annotation[len("Optional["):-1] if optional else annotation
        expected = _SCALAR_TYPES.get(core)
        value = getattr(settings, f.name)
        if expected is None or (value is None and optional):
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and core in ("int", "float")):
            raise ConfigError(f.name, value, f"a {core}" + (" or None" if optional else ""))


_Settings = TypeVar("_Settings", bound=type)


def known_keywords(cls: _Settings) -> _Settings:
    """Class decorator for a settings dataclass: an unknown keyword raises :class:`ConfigError`
    naming the closest fields (``QuantConfig(bits=4)``), where the generated ``__init__`` would
    raise a bare ``TypeError``."""
    init = cls.__init__  # type: ignore[misc]
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def checked_init(self, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
                hint = f"Did you mean {' or '.join(close)}?" if close else ""
                raise ConfigError(key, kwargs[key], f"{cls.__name__}'s keywords {names}", hint)
        init(self, *args, **kwargs)

    cls.__init__ = checked_init  # type: ignore[misc]
    return cls


@known_keywords
@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized.

    Args:
        bits: 1..8. One bit is ``scale * sign(x)``; more bits use an integer grid.
        symmetric: zero point 0 (signed grid) if True, else an unsigned grid with a zero point.
        narrow_range: drop the most negative level of a signed grid (2 bits -> ternary).
        granularity: ``per_tensor``, ``per_channel`` (one scale per slice along ``axis``) or
            ``per_group`` (blocks of ``group_size`` along ``axis``, ONNX blocked layout).
        axis: channel or block axis; ``None`` lets the annotator pick the natural one per op
            (output channels for per_channel, input channels for per_group).
        group_size: block length for ``per_group``.
        ste: straight-through surrogate: identity, clipped, hardtanh/tanh/approxsign (1 bit
            only) or lsq (clipped identity with a learned scale and LSQ gradient scaling).
        scale_init: ``maxabs``, ``mse`` (grid search of the clipping ratio) or ``percentile``.
        percentile: used by ``scale_init="percentile"``.
        learn_scale: make the scale a trainable parameter (implied by ``ste="lsq"``).
        reduce_range: use one bit less of a signed grid (8 bits: [-64, 63]), what ONNX Runtime
            calls reduce_range. ``None`` (the default) lets ``QuantConfig.target`` decide; a
            spec used outside a config reads ``None`` as False.
        scale_bits: significant bits of every scale entry's binary mantissa: 1 puts scales on
            powers of two, 4 on {1, 1.125, ..., 1.875} x 2^e, 0 allows any float32 scale.
            Calibration picks, per entry, the neighbour on that grid with the smaller squared
            error, and makes an asymmetric zero point even. ``None`` (the default) lets
            ``QuantConfig.exact_scales`` decide; a spec used outside a config reads ``None`` as 0.

    Example:
        >>> QuantSpec(bits=4, granularity="per_group", group_size=32).qrange
        (-8, 7)
        >>> QuantSpec(bits=8, reduce_range=True).qrange
        (-64, 63)
    """

    bits: int = 8
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "per_channel"
    axis: Optional[int] = None
    group_size: int = 32
    ste: str = "identity"
    scale_init: str = "maxabs"
    percentile: float = 99.99
    learn_scale: bool = False
    reduce_range: Optional[bool] = None
    scale_bits: Optional[int] = None

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(isinstance(self.bits, int) and 1 <= self.bits <= 8, "bits", self.bits, "an int in 1..8")
        _check(self.granularity in GRANULARITIES, "granularity", self.granularity, f"one of {GRANULARITIES}")
        _check(self.ste in STE_KINDS, "ste", self.ste, f"one of {STE_KINDS}")
        _check(self.scale_init in SCALE_INITS, "scale_init", self.scale_init, f"one of {SCALE_INITS}")
        _check(isinstance(self.group_size, int) and self.group_size >= 1, "group_size", self.group_size, "an int >= 1")
        _check(0.0 < self.percentile <= 100.0, "percentile", self.percentile, "a float in (0, 100]")
        _check(self.scale_bits is None or 0 <= self.scale_bits <= 23, "scale_bits", self.scale_bits,
               "None or an int in 0..23 (0: any float32 scale)")
        if self.scale_bits and self.bits == 1:
            raise ConfigError("scale_bits", self.scale_bits, "0 or None for bits=1",
                              "A 1-bit scale is mean |x|, not a grid step.")
        if self.ste in SIGN_ONLY_STE_KINDS and self.bits != 1:
            raise ConfigError("ste", self.ste, "identity, clipped or lsq for bits >= 2",
                              f"{self.ste} is a surrogate of sign(); use it with bits=1.")
        if self.bits == 1 and not self.symmetric:
            raise ConfigError("symmetric", False, "True for bits=1", "1-bit quantization is scale * sign(x).")
        if self.reduce_range and (not self.symmetric or self.bits < 3):
            raise ConfigError("reduce_range", self.reduce_range, "False or None unless symmetric with bits >= 3",
                              "Only signed grids of 3 bits or more have a bit to drop.")

    @property
    def qrange(self) -> tuple[int, int]:
        """Integer grid ``(qmin, qmax)``; 1 bit stores codes -1 and +1."""
        if self.bits == 1:
            return (-1, 1)
        if not self.symmetric:
            return (0, 2**self.bits - 1)
        half = 2 ** (self.bits - 2 if self.reduce_range else self.bits - 1)
        return (-half + int(self.narrow_range), half - 1)

    @property
    def grid_bits(self) -> int:
        """The mantissa bits calibration puts scales on; 0 for any float32 scale."""
        return self.scale_bits or 0

    @property
    def learns_scale(self) -> bool:
        return self.learn_scale or self.ste == "lsq"

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


SpecLike = Union[QuantSpec, Mapping[str, Any], None]
_INHERIT = object()


@known_keywords
@dataclass(frozen=True)
class QuantConfig:
    """Which tensors to quantize, and how.

    Args:
        weight: spec for weights (``None``: weights stay float).
        activation: spec for activations at the inputs of quantized ops (``None``: off).
        weight_bits, activation_bits: shortcuts that set ``bits`` of the spec (if only
            ``activation_bits`` is given, the activation spec is per tensor and asymmetric).
        overrides: ``{pattern_or_type: {"weight": spec, "activation": spec}}``. String keys are
            ``fnmatch`` patterns on module names, type keys match ``isinstance``. A value of
            ``None`` turns that tensor off, a dict replaces fields of the inherited spec, a
            ``QuantSpec`` replaces it. Type overrides apply first, then name patterns in order.
        skip: module-name patterns that stay in float.
        skip_first, skip_last: keep the first / last quantizable layer in float.
        quantize_pool_inputs: with an activation spec, also quantize the inputs of pooling and
            mean ops (so the conv before them ends in a Q and fuses to QLinearConv in ONNX Runtime).
        target: where the exported file runs, so that training uses the numerics the file will:
            ``"cpu"`` (ONNX Runtime CPU, the default), ``"cuda"`` (ONNX Runtime CUDA),
            ``"tensorrt"`` or ``"portable"`` (any runtime). On ``"cpu"`` and ``"portable"``,
            8-bit signed weights of ops whose activations are quantized use 7 bits ([-64, 63]):
            ONNX Runtime's int8 kernels on x86 CPUs without VNNI sum pairs of uint8 x int8
            products in int16 and saturate with full-range weights. ``"cuda"`` and
            ``"tensorrt"`` keep the full range. A spec that sets ``reduce_range`` wins.
        exact_scales: where both a weight and its op's input activation are quantized, put the
            calibrated activation scales on powers of two and the weight scales on 4-bit
            mantissas (``QuantSpec.scale_bits`` 1 and 4). Every product of codes and scales and
            every sum of them is then exact in float32 (sums below 2^20 code units), so a float
            kernel (torch, ``onnx.reference``) and an integer kernel (ONNX Runtime's QLinearConv,
            TensorRT) compute the same integers, and the file gives the model's codes bit for bit
            instead of a neighbouring code wherever a value lands within float noise of a
            rounding boundary. Zero points are even, so that kernels which add the zero point
            before rounding (ORT's QLinearAveragePool) round exact halves alike. It costs at most
            half a bit of activation resolution. Learned
            scales (they move off any grid as they train), 1-bit and per-group specs keep any
            float scale. A spec that sets ``scale_bits`` wins.

    Example:
        >>> cfg = QuantConfig(weight_bits=2, overrides={"head": {"weight": {"bits": 8}}})
        >>> cfg.weight.bits
        2
        >>> QuantConfig(weight_bits=8, activation_bits=8).resolve("fc", None)[0].qrange
        (-64, 63)
        >>> QuantConfig(weight_bits=8, activation_bits=8, target="tensorrt").resolve("fc", None)[0].qrange
        (-128, 127)
    """

    weight: Optional[QuantSpec] = field(default_factory=QuantSpec)
    activation: Optional[QuantSpec] = None
    weight_bits: Optional[int] = None
    activation_bits: Optional[int] = None
    overrides: Mapping[Union[str, type], Mapping[str, SpecLike]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    skip_first: bool = False
    skip_last: bool = False
    quantize_pool_inputs: bool = True
    target: str = "cpu"
    exact_scales: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.target in TARGETS, "target", self.target, f"one of {TARGETS}")
        for name in ("weight", "activation"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, QuantSpec), name, value,
                   "a QuantSpec or None (e.g. QuantSpec(bits=4)), or use weight_bits= / activation_bits=")
        _check(isinstance(self.overrides, Mapping), "overrides", self.overrides,
               "a dict from module-name pattern or module type to a QuantSpec-field dict")
        _check(isinstance(self.skip, (str, list, tuple)), "skip", self.skip, "a module-name pattern or a list of them")
        weight, activation = self.weight, self.activation
        if self.weight_bits is not None:
            weight = (weight or QuantSpec()).replace(bits=_bits("weight_bits", self.weight_bits))
        if self.activation_bits is not None:
            base = activation or DEFAULT_ACTIVATION
            activation = base.replace(bits=_bits("activation_bits", self.activation_bits))
        _check_activation(activation, "activation")
        for key, value in self.overrides.items():
            _check_override(key, value)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "activation", activation)
        # One pattern given as a string is that pattern, not its characters.
        object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))

    def resolve(self, module_name: str, module: Optional[nn.Module]) -> tuple[Optional[QuantSpec], Optional[QuantSpec]]:
        """The (weight, activation) specs for one module after overrides and skips."""
        if any(fnmatch.fnmatchcase(module_name, pattern) for pattern in self.skip):
            return None, None
        weight, activation = self.weight, self.activation
        type_rules = [(k, v) for k, v in self.overrides.items() if isinstance(k, type)]
        name_rules = [(k, v) for k, v in self.overrides.items() if isinstance(k, str)]
        for module_type, rule in type_rules:
            if module is not None and isinstance(module, module_type):
                weight, activation = _apply(rule, weight, activation)
        for pattern, rule in name_rules:
            if fnmatch.fnmatchcase(module_name, pattern):
                weight, activation = _apply(rule, weight, activation)
        weight = _target_preset(weight, activation, self.target)
        integer = weight is not None and activation is not None
        return (_scale_grid_preset(weight, WEIGHT_SCALE_BITS, self.exact_scales and integer),
                _scale_grid_preset(activation, ACTIVATION_SCALE_BITS, self.exact_scales and integer))


# The scale grids of exact_scales: products of a power-of-two activation step and a 4-bit weight
# step with 8-bit codes need 8 + 7 + 4 bits, and float32 holds sums of them exactly up to 2^20 units.
ACTIVATION_SCALE_BITS, WEIGHT_SCALE_BITS = 1, 4


def _scale_grid_preset(spec: Optional[QuantSpec], bits: int, exact: bool) -> Optional[QuantSpec]:
    """``spec`` with ``scale_bits`` resolved (an explicit value is kept)."""
    if spec is None or spec.scale_bits is not None:
        return spec
    on_grid = exact and spec.bits >= 2 and not spec.learns_scale and spec.granularity != "per_group"
    return spec.replace(scale_bits=bits if on_grid else 0)


def _target_preset(weight: Optional[QuantSpec], activation: Optional[QuantSpec], target: str) -> Optional[QuantSpec]:
    """The weight spec with ``reduce_range`` resolved for ``target`` (an explicit value is kept)."""
    if weight is None or weight.reduce_range is not None:
        return weight
    # 8-bit signed weights meet uint8 activations in ORT CPU's U8S8 kernels only when both are quantized.
    reduce = target in _REDUCED_RANGE_TARGETS and activation is not None and weight.bits == 8 and weight.symmetric
    return weight.replace(reduce_range=reduce)


def _apply(rule: Mapping[str, SpecLike], weight: Optional[QuantSpec], activation: Optional[QuantSpec]):
    return (_merge(rule.get("weight", _INHERIT), weight, QuantSpec()),
            _merge(rule.get("activation", _INHERIT), activation, DEFAULT_ACTIVATION))


def _merge(value: Any, inherited: Optional[QuantSpec], default: QuantSpec) -> Optional[QuantSpec]:
    if value is _INHERIT:
        return inherited
    if value is None or isinstance(value, QuantSpec):
        return value
    return (inherited or default).replace(**value)


def _check_override(key: object, value: object) -> None:
    if not isinstance(key, (str, type)):
        raise ConfigError("overrides", key, "keys that are module-name patterns (str) or module types")
    if not isinstance(value, Mapping) or not set(value) <= {"weight", "activation"}:
        raise ConfigError(f"overrides[{key!r}]", value, "a dict with keys 'weight' and/or 'activation'")
    for role, spec in value.items():
        if isinstance(spec, Mapping):
            try:
                QuantSpec().replace(**spec)
            except (TypeError, ConfigError) as error:
                raise ConfigError(f"overrides[{key!r}][{role!r}]", spec, "fields of QuantSpec", str(error)) from error
        elif spec is not None and not isinstance(spec, QuantSpec):
            raise ConfigError(f"overrides[{key!r}][{role!r}]", spec, "a QuantSpec, a dict of its fields, or None")
    if "activation" in value:
        _check_activation(_merge(value["activation"], None, DEFAULT_ACTIVATION), f"overrides[{key!r}]['activation']")


def _check_activation(spec: Optional[QuantSpec], where: str) -> None:
    if spec is not None and spec.granularity != "per_tensor":
        raise ConfigError(f"{where}.granularity", spec.granularity, "'per_tensor' for activations",
                          "Activation scales are calibrated per tensor.")


def _bits(name: str, bits: object) -> int:
    _check(isinstance(bits, int) and 1 <= bits <= 8, name, bits, "an int in 1..8")
    return bits  # type: ignore[return-value]


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(name, value, allowed)


# Activations: per tensor, unsigned with a zero point. After a ReLU the zero point is 0 on a uint8
# grid, which lets ONNX Runtime drop the ReLU and fuse QLinearConv/QGemm on CPU. TensorRT wants
# symmetric=True instead (the export lint says so).
DEFAULT_ACTIVATION = QuantSpec(granularity="per_tensor", symmetric=False)
