"""Weight-only quantization as a transform: `quantize(model, "int8")` swaps every nn.Linear for the inference module
`slmkit.infer.quantized.QuantLinear` and every Mixture-of-Experts weight stack for `QuantExperts` (int8 with one fp32
scale per output row, or bf16). Activations stay fp32.

Batch-1 decoding reads each weight once per token, so bytes per weight set the speed (docs/benchmarks.md,
bench/decode.py): fp32 4, bf16 2, int8 1 (+ 4 bytes of scale per row of `in` weights).
"""

from __future__ import annotations

from typing import get_args

from torch import nn

from slmkit.errors import SlmError
from slmkit.infer.quantized import QuantExperts, QuantLinear, WeightDtype
from slmkit.model.ffn import MoE


def quantize(model: nn.Module, dtype: WeightDtype = "int8", *, group: int = 32) -> nn.Module:
    """Quantize the matrix weights of `model` in place to `dtype` by round-to-nearest; returns the model.

    Replaced: every nn.Linear (→ QuantLinear) and the expert stacks of every MoE layer (→ QuantExperts). A head tied
    to the token embedding gets its own quantized copy. Kept fp32: the token and position embeddings (decoding reads
    one row per token), norms, biases, and MoE routers (C × E weights, a small fraction of one expert; they pick the
    experts, so rounding them could send a token elsewhere). "fp32" leaves the model unchanged. int4 uses one fp16
    scale per `group` weights of a row (slmkit.infer.quantized explains the layout).

    >>> quantize(LLM.load("runs/smollm2").model, "int8")
    """
    if dtype not in get_args(WeightDtype):
        raise SlmError(f"weight dtype {dtype!r} is not supported; use one of {', '.join(get_args(WeightDtype))}")
    if dtype == "fp32":
        return model
    for mod in list(model.modules()):
        if isinstance(mod, MoE):
            for name in ("fc", "proj"):
                stack = getattr(mod, name)
                if isinstance(stack, nn.Parameter):
                    delattr(mod, name)  # a parameter slot cannot take a module
                    setattr(mod, name, QuantExperts.from_stack(stack, dtype, group))
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and not (isinstance(mod, MoE) and child_name == "router"):
                setattr(mod, child_name, QuantLinear.from_linear(child, dtype, group))
    model.eval().requires_grad_(False)
    return model
