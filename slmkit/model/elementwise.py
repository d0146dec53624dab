"""RMSNorm, SwiGLU and RoPE for bf16 training on CPU, one pass each (kernels.c slm_rmsnorm_*, slm_swiglu_*, slm_rope).

Around the GEMMs of a bf16-autocast training step PyTorch runs each of these as a chain of operators, each a trip
through memory for a (rows, C) tensor: RMSNorm of the fp32 residual stream is pow, mean, rsqrt and two multiplies,
then the cast of its output to bf16 for the linear after it, and about twice as many backward; SwiGLU is silu and a
multiply, backward three more and a concatenation; RoPE rounds its tables to bf16 and, for each of q and k, chunks,
negates, concatenates, multiplies twice and adds. Here each is one call forward and one backward, computed in fp32
and rounded once to bf16 (PyTorch rounds after every operator, so results agree to bf16 rounding, not bit for bit).

A block's RMSNorm returns bf16 under bf16 autocast: the linear it feeds rounds its input to bf16 anyway. The final
norm keeps PyTorch's fp32 output (a classifier pools it in fp32), and so do norms ahead of an MoE layer (whose
experts' outputs are summed in the dtype of its input). Taken when the kernels are built, the tensors are on the
CPU, bf16 autocast is on and torch.compile is not tracing; otherwise the PyTorch formulas. bench/fused_step.py
times them against PyTorch's operators; the figures are in docs/benchmarks.md ("One-pass RMSNorm, SwiGLU and RoPE").
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
        w = self.weight
        if self.bf16_out and x.dtype == torch.float32 and (w is None or w.dtype == torch.float32) and fused_ok(x):
            eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
            return _RMSNorm.apply(x.contiguous(), w, eps)
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


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, pos: int, heads: int) -> Tensor:
        ctx.tables = (cos, sin, pos, heads)
        return kernels.rope(x, cos, sin, pos, heads)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin, pos, heads = ctx.tables
        dx = kernels.rope(dy.to(torch.bfloat16).contiguous(), cos, sin, pos, heads, inverse=True)
        return dx, None, None, None, None


def rope(x: Tensor, cos: Tensor, sin: Tensor, pos: int, heads: int) -> Tensor | None:
    """Rotate-half RoPE of x (B, T, heads·hd), a bf16 slice of the fused q/k/v projection's output, at positions
    pos.. of the fp32 tables cos/sin (positions, hd): (B, T, heads·hd) bf16 in one C pass, forward and backward, under
    CPU bf16 autocast; None where the kernel does not apply (the caller then runs PyTorch's formula)."""
    if x.dtype != torch.bfloat16 or cos.dtype != torch.float32 or x.stride(-1) != 1 or not fused_ok(x):
        return None  # (a model cast to bf16 has bf16 tables)
    return _Rope.apply(x, cos, sin, pos, heads)
