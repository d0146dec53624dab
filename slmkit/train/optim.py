"""Optimizers and learning-rate schedules.

`sgd` is torch's; `adamw` is torch's fused AdamW kernel behind a leaner step (AdamW below). `muon` is Muon (Jordan et
al. 2024, the modded-nanoGPT speedrun optimizer) for the hidden weight matrices plus AdamW for embeddings, the head,
norms and biases; on 2 CPU cores it reached 1.93 nats/char on char-level Shakespeare in 0.6x the steps of tuned AdamW
(docs/benchmarks.md, time_to_loss).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from slmkit.config import TrainConfig
from slmkit.runtime import cpu_has_fast_bf16

# quintic Newton-Schulz coefficients tuned for the fastest slope at zero (Jordan et al., "Muon", 2024)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """≈ U Vᵀ of g = U S Vᵀ for a batch of matrices (b, m, n) with m <= n, by a quintic Newton-Schulz iteration.

    The iteration drives every singular value into roughly [0.7, 1.2] rather than exactly 1, which trains as well and
    needs only matmuls. Runs in bf16 where the CPU multiplies bf16 natively (as the reference does on GPUs), else fp32.
    """
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):  # x ← a·x + (b·s + c·s²)·x with s = x·xᵀ, in two fused baddbmm calls
        s = x @ x.mT  # (…, m, m)
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices (nn.Linear layout: out × in).

    Per matrix: m ← μ·m + (1-μ)·g; u = orthogonalize(g + μ·(m - g)) (Nesterov) or orthogonalize(m);
    w ← w·(1 - lr·wd) - lr·√max(1, out/in)·u. Matrices of one shape (up to transposition) are orthogonalized as one
    batch: a GPT's 16 hidden matrices take 3 batched iterations instead of 16 (gpt-rope-0.8m on 2 cores: 16.4 ms per
    step vs torch.optim.Muon's 28.2 ms; bench/muon_step.py).
    """

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # closure: torch's signature; unused
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            batches: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.lerp_(p.grad, 1 - mu)
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                batches[(min(p.shape), max(p.shape))].append((p, u.mT if p.size(0) > p.size(1) else u))
            for items in batches.values():
                ortho = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
                for (p, _), o in zip(items, ortho, strict=True):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(o.mT if p.size(0) > p.size(1) else o, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))


class AdamW(torch.optim.Optimizer):
    """AdamW as one call to torch's fused kernel per parameter group, with gradient clipping folded into that kernel.

    Same update and the same state ("step", "exp_avg", "exp_avg_sq" per parameter) as torch.optim.AdamW(fused=True),
    so checkpoints load either way. What it drops is overhead: torch's step() re-collects its per-parameter lists in
    Python every call, and clip_grad_norm_ scales every gradient with its own op; clip + step on gpt-0.8m's parameters
    measured 1.13 ms for torch's vs 0.73 ms for this (bench/muon_step.py --preset gpt-0.8m). `clip_gradients` hands
    the clipping coefficient over in `grad_coef`; the kernel divides the gradients by 1/coef on the fly (its AMP
    `grad_scale`).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_coef: Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # closure: torch's signature; unused
        scale = None if self.grad_coef is None else self.grad_coef.reciprocal()
        self.grad_coef = None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, st in zip(params, states, strict=True):
                if not st:
                    st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                              exp_avg_sq=torch.zeros_like(p))
            steps = [st["step"] for st in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                                [st["exp_avg_sq"] for st in states], [], steps, lr=group["lr"], beta1=beta1,
                                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                maximize=False, grad_scale=scale)


def clip_gradients(optimizer: torch.optim.Optimizer | OptimizerSet, max_norm: float) -> Tensor | None:
    """Clip the gradients of everything `optimizer` updates to a total L2 norm of at most `max_norm` (what
    torch.nn.utils.clip_grad_norm_ does), without a pass over each gradient: the coefficient goes to AdamW's fused
    kernel, other optimizers get one foreach multiply. Returns the total norm before clipping (a tensor: no sync)."""
    parts = optimizer.parts if isinstance(optimizer, OptimizerSet) else [optimizer]
    grads = {o: [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None] for o in parts}
    flat = [g for gs in grads.values() for g in gs]
    if not flat:
        return None
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(flat)))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for o, gs in grads.items():
        if isinstance(o, AdamW):
            o.grad_coef = coef
        elif gs:
            torch._foreach_mul_(gs, coef)
    return total


class OptimizerSet:
    """Several optimizers over disjoint parameters, stepped as one (Muon's matrices + AdamW's rest). Exposes what the
    trainer uses: param_groups (all of them), step, zero_grad and a state dict holding each part's."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.parts for g in o.param_groups]

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [o.state_dict() for o in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("parts", ())) != len(self.parts):
            raise ValueError("optimizer state was saved by a different optimizer")
        for o, s in zip(self.parts, state["parts"], strict=True):
            o.load_state_dict(s)


def build_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer | OptimizerSet:
    """The optimizer for a model's `param_groups()` (groups tagged kind = matrix | embedding | vector).

    AdamW is the fused one above (one kernel per group, measured faster than foreach on CPU). Muon's groups are
    tagged optimizer="muon" so `set_lr` gives them muon_lr on the same schedule.
    """
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer == "adamw":
        return AdamW(param_groups, **adamw)
    matrices = [g for g in param_groups if g["kind"] == "matrix"]
    rest = [g for g in param_groups if g["kind"] != "matrix"]
    muon = Muon([{**g, "optimizer": "muon"} for g in matrices], lr=cfg.muon_lr)
    return OptimizerSet([muon, AdamW(rest, **adamw)])


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Learning rate for `step`, with `progress` ∈ [0, 1] the fraction of the budget (steps or time) used.

    Linear warmup over `warmup_steps`, times the schedule's shape over progress:
    cosine → lr to lr·min_lr_ratio; wsd (warmup-stable-decay) → flat, then linear decay over the last `decay_frac`.
    Shapes are functions of progress, not steps, so a time budget (--max-time) gets a complete schedule too.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        shape = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule == "wsd":
        start = 1 - cfg.decay_frac
        shape = 1.0 if p <= start else 1 - (1 - floor) * (p - start) / cfg.decay_frac
    else:
        shape = 1.0
    return cfg.lr * warm * shape


def set_lr(optimizer: torch.optim.Optimizer | OptimizerSet, cfg: TrainConfig, lr: float) -> None:
    """Apply the scheduled `lr` (for cfg.lr): Muon's groups get the same schedule scaled to cfg.muon_lr. Read from the
    config at every step, so a resumed run with a new --lr or --muon-lr uses the new values."""
    for group in optimizer.param_groups:
        group["lr"] = lr * cfg.muon_lr / cfg.lr if group.get("optimizer") == "muon" else lr
