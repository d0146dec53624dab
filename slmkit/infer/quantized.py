"""Weight-only quantized layers for inference: int8 (symmetric, one fp32 scale per output row) or bf16 weights, fp32
activations. `QuantLinear` stands in for an nn.Linear, `QuantExperts` for a Mixture-of-Experts layer's stacked expert
weights (slmkit.model.ffn.MoE). `slmkit.compress.quantize` is the transform that puts them into a model.

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


def quantize_rows(w: Tensor, dtype: WeightDtype) -> tuple[Tensor, Tensor]:
    """(..., N, K) weights → (packed weights, fp32 scales (..., N)): int8 with one scale per row of K, or bf16 with
    scale 1. Rows are what the kernels read, so a row is one output feature."""
    w = w.detach().float()
    if dtype == "int8":
        # symmetric per row: the row's largest |w| maps to 127; an all-zero row gets the least positive scale (no 0/0)
        scale = (w.abs().amax(dim=-1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    else:
        scale, q = torch.ones(w.shape[:-1]), w.to(torch.bfloat16)
    return q.contiguous(), scale.contiguous()


def _matmul(x2: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x2 (M, K) @ (weight (N, K) × scale (N,))ᵀ + bias → (M, N)."""
    if x2.shape[0] <= SMALL_BATCH and x2.dtype == torch.float32 and kernels.available():
        return kernels.matmul(x2, weight, scale, bias)
    w = (weight.float() * scale[:, None]).to(x2.dtype)
    return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))


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
        return cls(*quantize_rows(lin.weight, dtype), lin.bias)

    def dequantized(self) -> Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = _matmul(x.reshape(-1, self.in_features), self.weight, self.scale, self.bias)  # (M, N)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}"


class QuantExperts(nn.Module):
    """A quantized stack of E expert matrices. The MoE keeps its experts as one (E, in, out) parameter and computes
    `x @ fc[e]`; this module holds them transposed, `weight` (E, out, in) int8/bf16 with `scale` (E, out), so each
    expert is an (N, K) row-major matrix like an nn.Linear's — the layout the C kernels read with no copy.
    `experts(x, e)` is `x @ fc[e]` (biases stay with the MoE). Inference only."""

    def __init__(self, weight: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())  # (E, N, K)
        self.register_buffer("scale", scale.float().contiguous())  # (E, N)

    @classmethod
    def from_stack(cls, stack: Tensor, dtype: WeightDtype) -> QuantExperts:
        """stack: (E, in, out), as in slmkit.model.ffn.MoE."""
        return cls(*quantize_rows(stack.transpose(1, 2), dtype))

    @property
    def shape(self) -> torch.Size:
        """The stack's shape as the MoE sees it, (E, in, out)."""
        E, N, K = self.weight.shape
        return torch.Size((E, K, N))

    def dequantized(self) -> Tensor:
        """(E, in, out) fp32, what the stack stands for."""
        return (self.weight.float() * self.scale[..., None]).transpose(1, 2)

    def forward(self, x: Tensor, e: int) -> Tensor:
        return _matmul(x, self.weight[e], self.scale[e], None)  # (n, K) → (n, N)

    def extra_repr(self) -> str:
        E, N, K = self.weight.shape
        return f"experts={E}, in={K}, out={N}, weight={self.weight.dtype}"
