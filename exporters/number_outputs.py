"""Leave numbers out of an exported file's outputs.

torch.export flattens a model's output with pytree, and some containers hold plain numbers
beside their tensors: a Hugging Face sliding-window cache layer carries its ``cumulative_length``,
an ``int``. Exported, such a number becomes a graph output (a ``sym_size`` of an input), which the
model itself never returns as a tensor. The file's outputs are kept to the tensor leaves of the
model's output, in pytree order, which is what a user pairs them with (and what
:func:`qzo_fx.verify_onnx` compares).
"""
from __future__ import annotations

import onnx
import onnxscript.optimizer
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind, TensorArgument


def drop_number_outputs(exported: ExportedProgram, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the outputs that are numbers in ``exported``'s user outputs (and the
    nodes only they used). Left as it is where the two do not line up one to one.

    Example:
        >>> # a cache layer's (keys, values, length): the file returns keys and values
        >>> drop_number_outputs(exported, model)  # doctest: +SKIP
    """
    user = [spec for spec in exported.graph_signature.output_specs if spec.kind == OutputKind.USER_OUTPUT]
    numbers = {i for i, spec in enumerate(user) if not isinstance(spec.arg, TensorArgument)}
    if not numbers or len(user) != len(model.graph.output):
        return model
    kept = [value for i, value in enumerate(model.graph.output) if i not in numbers]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnxscript.optimizer.remove_unused_nodes(model)
    return model
