"""Weight-only quantized linear layers for inference: int8 (symmetric, one fp32 scale per output row) or bf16 weights,
fp32 activations. `slmkit.compress.quantize` is the transform that puts them into a model.

Small batches (decoding) run the kernel in slmkit/infer/kernels.py, which reads the packed weights directly; larger
ones (prefill) widen the weights once per call and use the fp32 matmul.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.infer import kernels

WeightDtype = Literal["fp32", "bf16", "int8"]
SMALL_BATCH = 16  # rows up to which the GEMV kernel beats widening + fp32 GEMM (the weights stay in cache per row)


class QuantLinear(nn.Module):
    """y = x @ (weight × scale)ᵀ + bias with int8 or bf16 `weight` (N, K) and fp32 `scale` (N,). Inference only."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: WeightDtype) -> QuantLinear:
        w = lin.weight.detach().float()
        if dtype == "int8":
            # symmetric per-row: the row's largest |w| maps to 127; an all-zero row keeps scale 1 (no 0/0)
            scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
            q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        else:
            scale, q = torch.ones(w.shape[0]), w.to(torch.bfloat16)
        return cls(q, scale, lin.bias)

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] <= SMALL_BATCH and x2.dtype == torch.float32 and kernels.available():
            y = kernels.matmul(x2, self.weight, self.scale, self.bias)
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}"
