"""Weight-only quantized layers for inference: int8 (symmetric, one fp32 scale per output row), int4 (symmetric, one
fp16 scale per group of 32/64/128 weights of a row, two weights per byte) or bf16 weights, fp32 activations.
`QuantLinear` stands in for an nn.Linear, `QuantExperts` for a Mixture-of-Experts layer's stacked expert weights
(slmkit.model.ffn.MoE). `slmkit.compress.quantize` is the transform that puts them into a model.

int4 layout (llama.cpp's Q4_0 within each 32-weight block, so group 32 maps onto GGUF Q4_0 without a detour):
    weight (N, K/2) uint8; for block b of a row (weights 32b .. 32b+31), byte 16b+j holds weight 32b+j in its low
    nibble and weight 32b+j+16 in its high nibble, each stored as q + 8 with q in [-8, 7];
    scale (N, K/group) fp16: w ≈ q · scale[n, k // group]. The scale of a group is its largest-magnitude weight / -8,
    so that weight lands exactly on q = -8 and the grid spends all 16 levels (Q4_0's rule).

Small batches (decoding) run the kernel in slmkit/kernels.py, which reads the packed weights directly; larger
ones (prefill) widen the weights once per call and use the fp32 matmul.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit import kernels
from slmkit.errors import SlmError

WeightDtype = Literal["fp32", "bf16", "int8", "int4"]
INT4_GROUPS = (32, 64, 128)
INT4_BLOCK = 32  # nibble-packing block (Q4_0's): groups are whole blocks
SMALL_BATCH = 16  # rows up to which the GEMV kernel beats widening + fp32 GEMM (the weights stay in cache per row)
# With AVX-512 VNNI the int8/int4 kernels work on 16 weight rows at once, and they beat widening up to long prompts
# (docs/benchmarks.md): prompts up to this many tokens (a server's prefill chunk) go through them, their activations
# rounded to int8 blocks as decoding's are. Longer inputs (evaluation batches) keep exact fp32 activations.
VNNI_BATCH = 256


def quantize_rows(w: Tensor, dtype: WeightDtype, group: int = 32) -> tuple[Tensor, Tensor]:
    """(..., N, K) weights → (packed weights, scales): int8 with one fp32 scale per row of K, bf16 with scale 1, or
    int4 with one fp16 scale per `group` weights of a row. Rows are what the kernels read: one output feature each."""
    w = w.detach().float()
    if dtype == "int4":
        return quantize_int4(w, group)
    if dtype == "int8":
        # symmetric per row: the row's largest |w| maps to 127; an all-zero row gets the least positive scale (no 0/0)
        scale = (w.abs().amax(dim=-1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    else:
        scale, q = torch.ones(w.shape[:-1]), w.to(torch.bfloat16)
    return q.contiguous(), scale.contiguous()


def int4_scales(w: Tensor, group: int) -> Tensor:
    """(..., K) weights → fp16 scales (..., K/group): each group's largest-magnitude weight / -8 (that weight maps to
    q = -8 exactly). Rounded to fp16 before use, as stored; an all-zero group gets scale 1 (its q are all 0)."""
    g = w.float().unflatten(-1, (-1, group))  # (..., K/group, group)
    idx = g.abs().argmax(dim=-1, keepdim=True)
    scale = (g.gather(-1, idx)[..., 0] / -8.0).to(torch.float16)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def int4_round(w: Tensor, scale: Tensor, group: int) -> Tensor:
    """Round (..., K) weights on the grid of fp16 `scale` (..., K/group) → int8 values q in [-8, 7] (unpacked)."""
    s = scale.float().repeat_interleave(group, dim=-1)
    return torch.round(w.float() / s).clamp_(-8, 7).to(torch.int8)


def pack_int4(q: Tensor) -> Tensor:
    """(..., K) int8 values in [-8, 7] → (..., K/2) uint8 in the Q4_0 block layout (see the module docstring)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8).unflatten(-1, (-1, 2, INT4_BLOCK // 2))  # (..., K/32, 2, 16)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).flatten(-2).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., K/2) uint8 → (..., K) int8 values in [-8, 7]; the inverse of `pack_int4`."""
    b = packed.unflatten(-1, (-1, INT4_BLOCK // 2))  # (..., K/32, 16)
    return (torch.stack([b & 0x0F, b >> 4], dim=-2).flatten(-3).to(torch.int16) - 8).to(torch.int8)


def quantize_int4(w: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest int4: (..., N, K) weights → (packed (..., N, K/2) uint8, scales (..., N, K/group) fp16)."""
    if group not in INT4_GROUPS:
        raise SlmError(f"int4 group={group} is not supported; use one of {', '.join(map(str, INT4_GROUPS))}")
    if w.shape[-1] % group:
        raise SlmError(f"int4 group {group} does not divide the input width {w.shape[-1]}; use a group that does "
                       f"({', '.join(str(g) for g in INT4_GROUPS if w.shape[-1] % g == 0) or 'none fits'})")
    scale = int4_scales(w, group)
    return pack_int4(int4_round(w, scale, group)), scale


def dequantize(weight: Tensor, scale: Tensor) -> Tensor:
    """fp32 weights (..., N, K) that packed `weight` + `scale` stand for, for every storage kind."""
    if weight.dtype == torch.uint8:  # int4
        q = unpack_int4(weight).float()
        return q * scale.float().repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)
    return weight.float() * scale.float()[..., None]


def _matmul(x2: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x2 (M, K) @ dequantize(weight, scale)ᵀ + bias → (M, N)."""
    if x2.dtype == torch.float32 and weight.dtype in kernels.KINDS and kernels.available():
        vnni = weight.dtype in (torch.int8, torch.uint8) and kernels.has_vnni()
        if x2.shape[0] <= (VNNI_BATCH if vnni else SMALL_BATCH):
            return kernels.matmul(x2, weight, scale, bias)
        return kernels.widened_matmul(x2, weight, scale, bias)
    w = dequantize(weight, scale).to(x2.dtype)
    return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))


class QuantLinear(nn.Module):
    """y = x @ dequantize(weight, scale)ᵀ + bias: int8 or bf16 `weight` (N, K) with fp32 `scale` (N,), or int4
    `weight` (N, K/2) uint8 with fp16 `scale` (N, K/group). Inference only."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        packed = weight.dtype == torch.uint8
        self.in_features, self.out_features = weight.shape[1] * (2 if packed else 1), weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", (scale.half() if packed else scale.float()).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: WeightDtype, group: int = 32) -> QuantLinear:
        return cls(*quantize_rows(lin.weight, dtype, group), lin.bias)

    @property
    def group(self) -> int | None:
        """Weights per int4 scale (None for int8/bf16: one scale per row)."""
        return self.in_features // self.scale.shape[1] if self.weight.dtype == torch.uint8 else None

    def dequantized(self) -> Tensor:
        return dequantize(self.weight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = _matmul(x.reshape(-1, self.in_features), self.weight, self.scale, self.bias)  # (M, N)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = f"int4 g{self.group}" if self.group else str(self.weight.dtype)
        return f"in={self.in_features}, out={self.out_features}, weight={kind}"


class QuantExperts(nn.Module):
    """A quantized stack of E expert matrices. The MoE keeps its experts as one (E, in, out) parameter and computes
    `x @ fc[e]`; this module holds them transposed, `weight` (E, out, in) int8/bf16 with `scale` (E, out), so each
    expert is an (N, K) row-major matrix like an nn.Linear's — the layout the C kernels read with no copy.
    `experts(x, e)` is `x @ fc[e]` (biases stay with the MoE). Inference only."""

    def __init__(self, weight: Tensor, scale: Tensor):
        super().__init__()
        packed = weight.dtype == torch.uint8  # int4: (E, N, K/2) with fp16 scales (E, N, K/group)
        self.register_buffer("weight", weight.contiguous())  # (E, N, K)
        self.register_buffer("scale", (scale.half() if packed else scale.float()).contiguous())  # (E, N)

    @classmethod
    def from_stack(cls, stack: Tensor, dtype: WeightDtype, group: int = 32) -> QuantExperts:
        """stack: (E, in, out), as in slmkit.model.ffn.MoE."""
        return cls(*quantize_rows(stack.transpose(1, 2), dtype, group))

    @property
    def shape(self) -> torch.Size:
        """The stack's shape as the MoE sees it, (E, in, out)."""
        E, N, K = self.weight.shape
        return torch.Size((E, K * (2 if self.weight.dtype == torch.uint8 else 1), N))

    def dequantized(self) -> Tensor:
        """(E, in, out) fp32, what the stack stands for."""
        return dequantize(self.weight, self.scale).transpose(1, 2)

    def forward(self, x: Tensor, e: int) -> Tensor:
        return _matmul(x, self.weight[e], self.scale[e], None)  # (n, K) → (n, N)

    def extra_repr(self) -> str:
        E, K, N = self.shape
        return f"experts={E}, in={K}, out={N}, weight={self.weight.dtype}"
