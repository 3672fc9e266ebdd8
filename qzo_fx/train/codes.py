"""Hold a prepared model's quantized weights as integer codes (no latent float copy), and back."""
from __future__ import annotations

from torch.fx import GraphModule

from qzo_fx.errors import QzoError
from qzo_fx.pass_infra import Pass, PassManager
from qzo_fx.passes.train.integer_codes import code_quantizer, use_integer_codes, use_latent_weights

__all__ = ["to_integer_codes", "to_latent_weights", "uses_integer_codes"]


def uses_integer_codes(qm: GraphModule) -> bool:
    return any(code_quantizer(qm, n) is not None for n in qm.graph.nodes)


def to_integer_codes(qm: GraphModule) -> GraphModule:
    """Switch ``qm`` (in place) to integer-code weights: each quantized weight becomes an int16
    buffer ``qzo_quant.<q>.codes`` read through ``qzo.dequantize``; latent floats are deleted.

    Example:
        >>> import torch, qzo_fx
        >>> qm = qzo_fx.prepare(torch.nn.Linear(4, 2), qzo_fx.QuantConfig(weight_bits=2))
        >>> qm = qzo_fx.to_integer_codes(qm)
        >>> qm.qzo_quant.weight.codes.dtype, hasattr(qm, "weight")
        (torch.int16, False)
    """
    if not isinstance(qm, GraphModule):
        raise QzoError(f"to_integer_codes takes a prepared model (GraphModule), got {type(qm).__name__}.")
    switch = Pass("use_integer_codes", use_integer_codes, "weights become grid integers")
    return PassManager([switch]).run(qm).graph_module


def to_latent_weights(qm: GraphModule) -> GraphModule:
    """Switch back (in place): latent float weights, initialised exactly on the grid."""
    switch = Pass("use_latent_weights", use_latent_weights, "codes become latent weights")
    return PassManager([switch]).run(qm).graph_module
