"""Distillation losses against a teacher's cached top-k distribution.

At each position the cache holds the teacher's k most likely token ids K, their log-probabilities log p_i, and the
log of the mass left outside them, r_t = 1 − Σ_{i∈K} p_i (slmkit.distill.cache). The student's distribution q is
computed in full (its logits are live), so its mass outside the teacher's ids, r_s = 1 − Σ_{i∈K} q_i, is known
exactly. Both are compared as distributions over k + 1 outcomes — each token of K, and "any other token":

    forward KL(p‖q) ≈ Σ_{i∈K} p_i (log p_i − log q_i) + r_t (log r_t − log r_s)
    reverse KL(q‖p) ≈ Σ_{i∈K} q_i (log q_i − log p_i) + r_s (log r_s − log r_t)

with 0 · log 0 = 0. At k = V there is no rest and both are the exact KL. For k < V each is the KL between the same
coarsening of p and q, so (data-processing inequality) it never exceeds the full KL, does not decrease as k grows (a
larger top-k refines the partition), and equals it when the student spreads its tail mass the way the teacher does:
the cache says how much mass the teacher leaves in the tail, not how it is spread, so only the student's total tail
mass is trained (log r_s passes each tail logit its share of the gradient). tests/distill/test_distill_losses.py
checks these against the full-softmax KL.

Temperature τ: p ∝ exp(z_t/τ) and q ∝ exp(z_s/τ). The teacher's side is cached at τ (its rest mass at another
temperature cannot be recovered from a top-k), so τ is part of the cache key. The KL term is multiplied by τ²
(Hinton et al. 2015): its gradient with respect to the logits shrinks as 1/τ², and τ² keeps its size comparable
across temperatures and next to the hard-label term:

    fkl: τ² · KL(p‖q)        rkl: τ² · KL(q‖p)        mix: α · τ² · KL(p‖q) + (1 − α) · CE(y, q at τ = 1)

Each KL is a mean over positions, in nats per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LOSSES = ("fkl", "rkl", "mix")
# a teacher log-prob of −inf (a masked token) would make p·(log p − log q) = 0·(−inf): NaN. exp(−1e4) is exactly 0 in
# fp32 and the product stays 0, so clamping changes no finite value that matters
_LOG_FLOOR = -1e4


def _rest_term(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a · (log a − log b) for masses given by their logs; 0 where a = 0. Both sides are made finite first, so the
    branch torch.where discards cannot send NaN into the gradient."""
    has = torch.isfinite(log_a)
    la, lb = torch.where(has, log_a, 0.0), torch.where(has, log_b, 0.0)
    return torch.where(has, la.exp() * (la - lb), 0.0)


def topk_kl(logits: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor, *, temperature: float = 1.0,
            reverse: bool = False) -> Tensor:
    """The KL between the teacher's cached top-k distribution and the student's, per position (module docstring).

    logits (..., V): the student's, untempered. ids (..., k): the teacher's top-k token ids; logp (..., k): their
    log-probabilities at `temperature`; log_rest (...): log of the teacher's mass outside them (−inf when k = V).
    Returns (...): KL(p‖q), or KL(q‖p) with `reverse`, in nats.

    >>> z = torch.randn(4, 10); p = (z / 2).log_softmax(-1); lp, i = p.topk(10)
    >>> kl = topk_kl(torch.randn(4, 10), i, lp, torch.full((4,), float("-inf")), temperature=2.0)  # exact at k = V
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # (...)
    ids = ids.long()
    logq = z.gather(-1, ids) - lse.unsqueeze(-1)  # (..., k)
    logp = logp.float().clamp_min(_LOG_FLOOR)
    log_rest_t = log_rest.float()
    if ids.size(-1) < z.size(-1):
        # the student's mass outside the teacher's ids, as a log-sum-exp over the other logits: exact even when it is
        # tiny (1 − Σ q_i would cancel to noise there, and its gradient 1/r_s would blow the noise up)
        log_rest_s = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1) - lse  # (...)
    else:
        log_rest_s = torch.full_like(lse, float("-inf"))
    if reverse:
        return (logq.exp() * (logq - logp)).sum(-1) + _rest_term(log_rest_s, log_rest_t)
    return (logp.exp() * (logp - logq)).sum(-1) + _rest_term(log_rest_t, log_rest_s)


# the student's tail mass r_s = 1 − Σ_K q_i by subtraction is exact to ~1e-6 absolute (fp32 log-probs summed in
# float64); above this it is within 1e-4 relative and is used as is. Rows whose tail is smaller are summed over the
# tail itself (a masked log-sum-exp over those rows only), where the subtraction would cancel to noise
_TAIL_BY_SUBTRACTION = 1 / 16


def _student_log_rest(logq_all: Tensor, logq: Tensor, ids: Tensor) -> Tensor:
    """log r_s per row from the student's log-probabilities logq_all (N, V) and their top-k gather logq (N, k)."""
    if ids.size(-1) == logq_all.size(-1):
        return torch.full(logq.shape[:-1], float("-inf"), dtype=logq.dtype)
    rest = 1 - logq.double().exp().sum(-1)
    out = rest.clamp_min(_TAIL_BY_SUBTRACTION).log().to(logq.dtype)
    tight = (rest < _TAIL_BY_SUBTRACTION).nonzero().squeeze(-1)
    if tight.numel():
        out[tight] = torch.logsumexp(logq_all[tight].scatter_(-1, ids[tight], float("-inf")), dim=-1)
    return out


class _ForwardKL(torch.autograd.Function):
    """α·τ²·KL(p‖q) + (1 − α)·CE(y, q at τ = 1), averaged over N positions, with the backward written out.

    Why: autograd through topk_kl keeps a masked copy of the (N, V) logits for the backward and walks the vocabulary
    about twice as often; at a 49k vocabulary those passes are most of a small student's step. Here the forward is one
    fused log-softmax (saved; the tail mass r_s comes from the top-k, _student_log_rest) and the backward two in-place
    passes over it. The gradient has a closed form: with S = Σ_K p_i + r_t (1 up to the cache's rounding) and
    w = r_t / r_s,

        ∂KL/∂(z_j/τ) = S·q_j − p_j  (j ∈ K),    (S − w)·q_j  (j ∉ K)

    — the student's softmax minus the teacher's distribution with its rest mass spread the way the student spreads
    its own tail; the cross-entropy adds q¹ − onehot(y). Every tail column is q_j times a per-row factor c, written as
    exp(log q_j + log |c|) (and the sign of the few rows with c < 0 flipped). tests/distill/test_distill_losses.py
    checks value and gradient against autograd through topk_kl.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor, y: Tensor, tau: float,
                alpha: float) -> Tensor:  # z (N, V) fp32, ids (N, k), logp (N, k), log_rest (N,), y (N,)
        logq_all = torch.log_softmax(z / tau if tau != 1.0 else z, dim=-1)  # (N, V)
        logq = logq_all.gather(-1, ids)  # (N, k)
        log_rest_s = _student_log_rest(logq_all, logq, ids)
        p = logp.exp()
        kl = (p * (logp - logq)).sum(-1) + _rest_term(log_rest, log_rest_s)  # (N,)
        loss = alpha * tau**2 * kl.mean()
        if alpha < 1:
            logq1_y = logq_all.gather(-1, y.unsqueeze(-1)).squeeze(-1) if tau == 1.0 else \
                z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
            loss = loss - (1 - alpha) * logq1_y.mean()
        ctx.save_for_backward(logq_all, logq, ids, p, log_rest, log_rest_s, y, z if tau != 1.0 else None)
        ctx.tau, ctx.alpha = tau, alpha
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        logq_all, logq, ids, p, log_rest, log_rest_s, y, z = ctx.saved_tensors
        tau, alpha, N = ctx.tau, ctx.alpha, logq_all.size(0)
        has = torch.isfinite(log_rest)
        r_t = torch.where(has, log_rest.exp(), 0.0)
        w = torch.where(has, (torch.where(has, log_rest, 0.0) - log_rest_s).exp(), 0.0)  # r_t / r_s
        S = p.sum(-1) + r_t
        q_k = logq.exp()
        kl_scale = g * (alpha * tau / N)  # τ² · (1/τ from z/τ), averaged over positions, times the upstream gradient
        ce_scale = g * ((1 - alpha) / N)
        # at τ = 1 the cross-entropy's softmax is q itself, so both terms scale the same tensor; the top-k columns
        # and the label are then written over / added to
        fused = tau == 1.0  # (at α = 1 ce_scale is 0 and adds nothing)
        c = kl_scale * (S - w) + (ce_scale if fused else 0)  # (N,)
        # q·|c| in place of the saved log-softmax (a second backward through retain_graph fails autograd's version check
        # on it instead of reading a spent tensor)
        grad = logq_all.add_(c.abs().log().unsqueeze(-1)).exp_()
        neg = (c < 0).nonzero().squeeze(-1)
        if neg.numel():
            grad[neg] = grad[neg].neg_()
        grad.scatter_(-1, ids, kl_scale * (q_k * S.unsqueeze(-1) - p) + (ce_scale * q_k if fused else 0))
        if alpha < 1:
            if not fused:
                grad.add_(torch.log_softmax(z, dim=-1).exp_().mul_(ce_scale))
            grad.scatter_add_(-1, y.unsqueeze(-1), (-ce_scale).expand(N, 1))
        return grad, None, None, None, None, None, None


def distill_loss(logits: Tensor, targets: Tensor, ids: Tensor, logp: Tensor, log_rest: Tensor, *, loss: str = "mix",
                 temperature: float = 1.0, alpha: float = 0.5) -> Tensor:
    """The training loss (module docstring: fkl, rkl, mix) as a scalar: logits (B, T, V) of the student, targets
    (B, T) the next tokens (hard labels, for mix), and the teacher's cache rows (topk_kl) for the same positions.
    fkl and mix run through _ForwardKL (the same numbers as topk_kl, with a leaner backward)."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {', '.join(LOSSES)}")
    if loss == "rkl":
        return topk_kl(logits, ids, logp, log_rest, temperature=temperature, reverse=True).mean() * temperature**2
    V, k = logits.size(-1), ids.size(-1)
    return _ForwardKL.apply(logits.float().reshape(-1, V), ids.long().reshape(-1, k),
                            logp.float().clamp_min(_LOG_FLOOR).reshape(-1, k), log_rest.float().reshape(-1),
                            targets.reshape(-1), float(temperature), alpha if loss == "mix" else 1.0)
