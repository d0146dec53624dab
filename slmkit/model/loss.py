"""Next-token cross-entropy with its backward written out, a few rows at a time.

At a small model's width and a large vocabulary (SmolLM2's 49,152 tokens) the loss over the (N, V) logits is a
large part of a training step. PyTorch's cross_entropy on `logits.float()` makes an fp32 copy of the logits, saves an
(N, V) log-softmax, and its backward builds a dense one-hot gradient that log_softmax's backward reads back with the
saved output to write a third (N, V) tensor — each a trip through main memory. The gradient has a closed form,

    ∂CE/∂z_j = (softmax(z)_j − [j = y]) / n        (n = positions whose target is not ignored)

so here the forward keeps only the per-row log-sum-exp (N,) and the backward writes the gradient straight into a
tensor of the logits' dtype, a few rows at a time in an fp32 scratch that stays in cache. Nothing of size (N, V) is
saved beyond the logits themselves. bench/distill_loss.py times it against F.cross_entropy; tests/model/test_loss.py
checks value and gradient. Under torch.compile the plain F.cross_entropy is used: inductor fuses it itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# rows per chunk: about 2^19 fp32 values (2 MB) of scratch, about a core's L2 (2^18 and 2^20 timed a little slower)
_CHUNK_VALUES = 1 << 19


def _rows_per_chunk(V: int) -> int:
    return max(1, _CHUNK_VALUES // V)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, y: Tensor, ignore_index: int, mean: bool) -> Tensor:  # z (N, V), y (N,)
        N, V = z.shape
        C = _rows_per_chunk(V)
        lse = torch.empty(N, dtype=torch.float32, device=z.device)
        for s in range(0, N, C):
            lse[s : s + C] = torch.logsumexp(z[s : s + C].float(), dim=-1)
        keep = y != ignore_index
        y_safe = torch.where(keep, y, 0)
        picked = z.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1).float()
        n = keep.sum() if mean else torch.ones((), dtype=torch.long, device=z.device)
        ctx.save_for_backward(z, lse, y_safe, keep, n)
        return ((lse - picked) * keep).sum() / n

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, lse, y_safe, keep, n = ctx.saved_tensors
        N, V = z.shape
        C = _rows_per_chunk(V)
        scale = (g / n) * keep  # (N,): 0 on ignored rows
        out = torch.empty_like(z)
        for s in range(0, N, C):
            e = min(s + C, N)
            sc = scale[s:e].unsqueeze(-1)
            chunk = (z[s:e] - lse[s:e].unsqueeze(-1)).exp_().mul_(sc)  # fp32 (promoted): softmax · scale
            chunk.scatter_add_(-1, y_safe[s:e].unsqueeze(-1), -sc)  # − scale at the target, before any rounding
            out[s:e] = chunk
        return out, None, None, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -1, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in nats, as F.cross_entropy(logits.float(), targets, ignore_index=..., reduction=...)
    for reduction "mean" or "sum": logits (..., V) in any float dtype, targets (...) token ids. The gradient comes
    back in the logits' dtype."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r} is not 'mean' or 'sum'")
    z, y = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(z.float(), y, ignore_index=ignore_index, reduction=reduction)
    return _CrossEntropy.apply(z, y, ignore_index, reduction == "mean")
