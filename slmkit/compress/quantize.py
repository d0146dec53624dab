"""Weight-only quantization as a transform: `quantize(model, "int8")` swaps every nn.Linear for the inference module
`slmkit.infer.quantized.QuantLinear` (int8 with one fp32 scale per output row, or bf16). Activations stay fp32.

Batch-1 decoding reads each weight once per token, so bytes per weight set the speed (docs/benchmarks.md,
bench/decode.py): fp32 4, bf16 2, int8 1.
"""

from __future__ import annotations

from torch import nn

from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantLinear, WeightDtype


def quantize(model: nn.Module, dtype: WeightDtype = "int8") -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear with `dtype` weights; returns the model.

    A head tied to the token embedding gets its own quantized copy (the embedding stays fp32: decoding reads only one
    row of it per token). "fp32" leaves the model unchanged.

    >>> quantize(LLM.load("runs/smollm2").model, "int8")
    """
    if dtype not in ("fp32", "bf16", "int8"):
        raise SlmError(f"weight dtype {dtype!r} is not supported; use fp32, bf16 or int8")
    if dtype == "fp32":
        return model
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, child_name, QuantLinear.from_linear(child, dtype))
    model.eval().requires_grad_(False)
    return model
