"""RMSNorm and SwiGLU for bf16 training on CPU, one pass each (the C kernels slm_rmsnorm_* and slm_swiglu_*).

Around the GEMMs of a bf16-autocast training step PyTorch runs each of these as a chain of operators, each a trip
through memory for a (rows, C) tensor: RMSNorm of the fp32 residual stream is pow, mean, rsqrt and two multiplies,
then the cast of its output to bf16 for the linear after it, and about twice as many backward; SwiGLU is silu and a
multiply, backward three more and a concatenation. Here each is one call forward and one backward, in fp32 and rounded
once to bf16 (PyTorch rounds after every operator, so results agree to bf16 rounding, not bit for bit).

A block's RMSNorm returns bf16 under bf16 autocast: the linear it feeds rounds its input to bf16 anyway. The final
norm keeps PyTorch's fp32 output (a classifier pools it in fp32), and so do norms ahead of an MoE layer (whose
experts' outputs are summed in the dtype of its input). Taken when the kernels are built, the tensors are on the
CPU, bf16 autocast is on and torch.compile is not tracing; otherwise the PyTorch formulas. The measured gain is in
docs/benchmarks.md ("A faster LoRA step").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit import kernels
from slmkit.runtime import bf16_autocast


def fused_ok(x: Tensor) -> bool:
    """Whether the one-pass kernels take `x`: a CPU tensor under bf16 autocast, outside torch.compile, kernels built."""
    return bf16_autocast(x) and not torch.compiler.is_compiling() and kernels.available()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, eps: float) -> Tensor:
        y, rstd = kernels.rmsnorm(x, None if w is None else w.detach(), eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        wd = None if w is None else w.detach()
        dx = kernels.rmsnorm_backward(dy, x, wd, rstd) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # a trained norm (full fine-tuning): Σ_rows dy · x · rstd
            C = x.size(-1)
            dw = (dy.reshape(-1, C).float() * x.reshape(-1, C) * rstd[:, None]).sum(0)
        return dx, dw, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters, same state dict). With `bf16_out`, under CPU bf16 autocast the output is bf16 from
    one C pass (module docstring); otherwise nn.RMSNorm's."""

    def __init__(self, dim: int, eps: float | None = None, bf16_out: bool = False):
        super().__init__(dim, eps=eps)
        self.bf16_out = bf16_out

    def forward(self, x: Tensor) -> Tensor:
        if self.bf16_out and x.dtype == torch.float32 and fused_ok(x):
            eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
            return _RMSNorm.apply(x.contiguous(), self.weight, eps)
        return super().forward(x)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return kernels.swiglu(h)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return kernels.swiglu_backward(h, dout.to(torch.bfloat16).contiguous())


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) · up for h (..., 2H), gate the first half → (..., H): one C pass for a bf16 h under CPU bf16
    autocast, PyTorch's silu and multiply otherwise."""
    if h.dtype == torch.bfloat16 and fused_ok(h):
        return _SwiGLU.apply(h.contiguous())
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
