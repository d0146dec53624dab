"""Round-to-nearest: the transform behind `quantize(model, dtype)` (method "rtn"), and the path the calibrated methods
(gptq.py, awq.py) send what they do not calibrate through. Its own module so those can use it without importing the
`quantize` dispatcher that imports them."""

from __future__ import annotations

from torch import nn

from slmkit.infer.quantized import QuantExperts, QuantLinear, WeightDtype
from slmkit.model.ffn import MoE


def round_to_nearest(model: nn.Module, dtype: WeightDtype, group: int = 32) -> nn.Module:
    """Swap every nn.Linear but MoE routers for a QuantLinear and every fp32 MoE expert stack for QuantExperts, each
    rounded to nearest in `dtype` ("fp32": unchanged); returns the model (slmkit.compress.quantize documents what is
    kept fp32 and why)."""
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
