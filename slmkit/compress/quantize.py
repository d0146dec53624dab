"""Weight-only quantization as a transform: `quantize(model, "int8")` swaps every nn.Linear for the inference module
`slmkit.infer.quantized.QuantLinear` and every Mixture-of-Experts weight stack for `QuantExperts` (int8 with one fp32
scale per output row, or bf16). Activations stay fp32.

Batch-1 decoding reads each weight once per token, so bytes per weight set the speed (docs/benchmarks.md,
bench/decode.py): fp32 4, bf16 2, int8 1 (+ 4 bytes of scale per row of `in` weights).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor, nn

from slmkit.compress.awq import awq
from slmkit.compress.gptq import gptq
from slmkit.compress.rtn import round_to_nearest
from slmkit.errors import SlmError
from slmkit.infer.quantized import WeightDtype

Method = Literal["rtn", "gptq", "awq"]


def quantize(model: nn.Module, dtype: WeightDtype = "int8", *, group: int = 32, method: Method = "rtn",
             calib: Tensor | None = None) -> nn.Module:
    """Quantize the matrix weights of `model` in place to `dtype`; returns the model. `method`: "rtn" rounds each
    weight to nearest; "gptq" (slmkit.compress.gptq) and "awq" (slmkit.compress.awq) calibrate int4 weights on the
    token ids `calib` (B, T) and store them in the same format.

    Replaced: every nn.Linear (→ QuantLinear) and the expert stacks of every MoE layer (→ QuantExperts). A head tied
    to the token embedding gets its own quantized copy. Kept fp32: the token and position embeddings (decoding reads
    one row per token), norms, biases, and MoE routers (C × E weights, a small fraction of one expert; they pick the
    experts, so rounding them could send a token elsewhere). "fp32" leaves the model unchanged. int4 uses one fp16
    scale per `group` weights of a row (slmkit.infer.quantized explains the layout).

    >>> quantize(LLM.load("runs/smollm2").model, "int8")
    >>> quantize(model, "int4", group=32, method="gptq", calib=calib_ids)
    """
    if dtype not in get_args(WeightDtype):
        raise SlmError(f"weight dtype {dtype!r} is not supported; use one of {', '.join(get_args(WeightDtype))}")
    if method not in get_args(Method):
        raise SlmError(f"quantization method {method!r} is not supported; use one of {', '.join(get_args(Method))}")
    if method != "rtn":
        name = method.upper()
        if dtype != "int4":
            raise SlmError(f"{name} calibrates int4 weights, not {dtype}; use dtype int4 (or method rtn)")
        if calib is None:
            raise SlmError(f"{name} needs calibration data: pass calib, a (batch, tokens) tensor of token ids")
        return (gptq if method == "gptq" else awq)(model, calib, group=group)
    if calib is not None:
        raise SlmError("calibration data is for the calibrated methods (gptq, awq); round-to-nearest needs none")
    return round_to_nearest(model, dtype, group)
