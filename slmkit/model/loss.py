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

`linear_cross_entropy(h, weight, targets)` goes one step further for training (GPT.forward with targets): the head's
matmul and the loss together, a chunk of rows at a time. Each chunk's logits (rows × V) are made, turned into the
loss and, in place, into their gradient, and multiplied straight back into the gradient of h (and of the weight, when
it trains); the backward only scales what the forward kept. The (N, V) logits of a batch and their gradient never
exist: two (N, V) tensors not written and read back. The per-row arithmetic (log-sum-exp, softmax − one-hot) is the
C kernel slm_xent_rows where the kernels are built (slmkit/kernels.py), PyTorch otherwise.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slmkit import kernels
from slmkit.runtime import bf16_autocast

# rows per chunk: about 2^19 fp32 values (2 MB) of scratch, about a core's L2 (2^18 and 2^20 timed a little slower)
_CHUNK_VALUES = 1 << 19


def _rows_per_chunk(V: int) -> int:
    return max(1, _CHUNK_VALUES // V)


def _xent_rows(z: Tensor, y: Tensor, scale: Tensor | None) -> Tensor:
    """Each row's loss lse(z_r) − z_r[y_r] (R,) fp32 for logits z (R, V) (contiguous, bf16 or fp32) and targets y
    (R,) in [0, V); with `scale` (R,), z is overwritten by its gradient scale_r · (softmax(z_r) − onehot(y_r)), computed
    in fp32 and rounded once to z's dtype."""
    if kernels.available() and z.dtype in (torch.bfloat16, torch.float32):
        return kernels.xent_rows(z, y, scale)
    R, V = z.shape
    C = _rows_per_chunk(V)
    loss = torch.empty(R, dtype=torch.float32, device=z.device)
    for s in range(0, R, C):
        e = min(s + C, R)
        zf = z[s:e].float()
        lse = torch.logsumexp(zf, dim=-1)
        loss[s:e] = lse - zf.gather(-1, y[s:e].unsqueeze(-1)).squeeze(-1)
        if scale is not None:
            sc = scale[s:e].unsqueeze(-1)
            g = (zf - lse.unsqueeze(-1)).exp_().mul_(sc)  # softmax · scale
            g.scatter_add_(-1, y[s:e].unsqueeze(-1), -sc)  # − scale at the target, before any rounding
            z[s:e] = g
    return loss


def _targets(y: Tensor, ignore_index: int, mean: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(targets with ignored ones replaced by 0, which rows count, the divisor: their number, or 1 for a sum)."""
    keep = y != ignore_index
    n = keep.sum() if mean else torch.ones((), dtype=torch.long, device=y.device)
    return torch.where(keep, y, 0), keep, n


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, y: Tensor, ignore_index: int, mean: bool) -> Tensor:  # z (N, V), y (N,)
        y_safe, keep, n = _targets(y, ignore_index, mean)
        z = z.contiguous()
        losses = _xent_rows(z, y_safe, None)
        ctx.save_for_backward(z, y_safe, keep, n)
        return (losses * keep).sum() / n

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        z, y_safe, keep, n = ctx.saved_tensors
        out = z.clone()
        _xent_rows(out, y_safe, (g / n) * keep)  # 0 on ignored rows
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


# logits per chunk of linear_cross_entropy: 2^24 values, a few hundred rows at SmolLM2's vocabulary; chunks of few rows
# make the head's matmuls less efficient
_FUSED_VALUES = 1 << 24

_rounded: tuple[Any, int, torch.dtype, Tensor] | None = None  # (weakref to a frozen weight, its version, dtype, copy)


def _compute_weight(w: Tensor, dt: torch.dtype) -> Tensor:
    """`w` in dtype dt. A frozen weight (no grad) is rounded once and kept while it is alive and unchanged: a tied
    embedding rounded on every step is a visible share of a LoRA step (docs/benchmarks.md, the fused loss)."""
    global _rounded
    if w.dtype == dt or w.requires_grad:
        return w.to(dt)
    r = _rounded
    if r is None or r[0]() is not w or r[1] != w._version or r[2] != dt:
        _rounded = r = (weakref.ref(w), w._version, dt, w.detach().to(dt))
    return r[3]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, y: Tensor, ignore_index: int, mean: bool,  # h (N, C), w (V, C)
                dt: torch.dtype) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        y_safe, keep, n = _targets(y, ignore_index, mean)
        hc, wc = h.to(dt).contiguous(), _compute_weight(w, dt)
        N, V = hc.shape[0], wc.shape[0]
        scale = (keep / n).float() if need_h or need_w else None
        gh = torch.empty_like(hc) if need_h else None
        gw = torch.zeros(wc.shape, dtype=torch.float32) if need_w else None
        losses = torch.empty(N, dtype=torch.float32)
        R = max(1, _FUSED_VALUES // V)
        for s in range(0, N, R):
            e = min(s + R, N)
            z = hc[s:e] @ wc.t()  # (rows, V) logits → their gradient, in place
            losses[s:e] = _xent_rows(z, y_safe[s:e], None if scale is None else scale[s:e])
            if gh is not None:
                torch.mm(z, wc, out=gh[s:e])
            if gw is not None:
                gw += (z.t() @ hc[s:e]).float()
        ctx.save_for_backward(gh, gw)
        ctx.dtypes = (h.dtype, w.dtype)
        return (losses * keep).sum() / n

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        gh, gw = ctx.saved_tensors
        return (None if gh is None else (gh * g).to(ctx.dtypes[0]),
                None if gw is None else (gw * g).to(ctx.dtypes[1]), None, None, None, None)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1,
                         reduction: str = "mean") -> Tensor:
    """cross_entropy(h @ weightᵀ, targets) without the logits: h (..., C) hidden states, weight (V, C) the head,
    targets (...) token ids. Under bf16 autocast the matmuls run in bf16 as F.linear's would; the loss and each
    logit's gradient in fp32. The forward computes the gradients (of h, and of the weight if it requires grad) as it
    goes, so it costs what a forward and backward cost together and the backward is a multiplication; call it for
    training or under torch.no_grad (evaluation: the loss alone)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r} is not 'mean' or 'sum'")
    h2, y = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(F.linear(h2, weight).float(), y, ignore_index=ignore_index, reduction=reduction)
    dt = torch.bfloat16 if bf16_autocast(h2) else h2.dtype
    return _LinearCrossEntropy.apply(h2, weight, y, ignore_index, reduction == "mean", dt)
