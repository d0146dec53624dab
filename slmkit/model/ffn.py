"""Feed-forward parts: the dense MLP, the Mixture-of-Experts FFN, and the low-rank factorised linear layer.

Shapes: B = batch, T = tokens, N = B·T tokens, C = n_embd, H = hidden width (per expert for MoE), E = experts,
k = experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.config import ModelConfig
from slmkit.model.elementwise import swiglu as fused_swiglu


class LowRankLinear(nn.Module):
    """W ≈ B·A with rank r: `in·r + r·out` weights instead of `in·out` (ALBERT-style factorised projection).

    The bias (if any) lives on the second factor, so `b.bias` plays the part of the dense layer's bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.rank = rank
        self.a = nn.Linear(in_features, rank, bias=False)  # (r, in)
        self.b = nn.Linear(rank, out_features, bias=bias)  # (out, r)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))

    def init_factors(self, std: float) -> None:
        """Draw both factors so the product B·A has entries of standard deviation `std`, like the dense layer it
        replaces: Var(BA)_ij = r·σ_a²·σ_b², so σ_a = σ_b = (std²/r)^¼. (Drawing each with `std` would leave the product
        ~50x smaller at r=64 and the layer would barely train at first.)"""
        s = (std * std / self.rank) ** 0.25
        nn.init.normal_(self.a.weight, std=s)
        nn.init.normal_(self.b.weight, std=s)
        if self.b.bias is not None:
            nn.init.zeros_(self.b.bias)


def make_linear(cfg: ModelConfig, in_features: int, out_features: int) -> nn.Module:
    """A projection inside a block: dense `nn.Linear`, or `LowRankLinear` when `cfg.lowrank` > 0."""
    if cfg.lowrank:
        return LowRankLinear(in_features, out_features, cfg.lowrank, cfg.bias)
    return nn.Linear(in_features, out_features, bias=cfg.bias)


def _activate(h: Tensor, swiglu: bool) -> Tensor:
    if swiglu:
        return fused_swiglu(h)
    # exact (erf) GELU, not GPT-2's tanh approximation: torch's CPU tanh-GELU kernel measured 5x slower here
    return F.gelu(h)


class MLP(nn.Module):
    """GELU (GPT-2) or SwiGLU (Llama). SwiGLU's gate and up projections share one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        self.fc = make_linear(cfg, cfg.n_embd, 2 * hidden if self.swiglu else hidden)
        self.proj = make_linear(cfg, hidden, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(_activate(self.fc(x), self.swiglu))  # (B, T, C)


class MoE(nn.Module):
    """Mixture-of-Experts FFN: a softmax router sends each token to its top-k of E experts (each an MLP of width
    `mlp_hidden`); the output is the gate-weighted sum of those experts' outputs.

    Gates: k = 1 uses the router probability itself (Switch Transformer: the router learns through it); k > 1
    renormalises the top-k probabilities to sum to 1 (Mixtral).
    Load balancing (Switch Transformer eq. 4): aux = E · Σ_e f_e · P_e, with f_e the fraction of token→expert
    assignments that chose expert e and P_e the mean router probability of e; aux = 1 when perfectly balanced.
    Capacity: with `capacity_factor` c, each expert takes at most ceil(c · N·k / E) assignments per forward, earliest
    tokens first; the rest are dropped (that expert adds nothing; the residual stream carries the token on).
    Dispatch groups assignments by expert with one argsort and runs one matmul per expert — a Python loop over E
    experts, never over tokens.

    Each call appends a `MoECall` (aux term, assignment counts, dropped count) to `self.calls`, a list owned by the
    model, so a module shared across layers still reports once per layer.

    `fc` and `proj` are parameters until `slmkit.compress.quantize` swaps each for a quantized stack (a module called
    as `fc(x, e)` for `x @ fc[e]`, with the same `.shape`); the forward pass works with either.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.E, self.k, self.capacity_factor = cfg.moe_experts, cfg.moe_top_k, cfg.moe_capacity_factor
        self.swiglu = cfg.mlp == "swiglu"
        C, H = cfg.n_embd, cfg.mlp_hidden
        H_in = 2 * H if self.swiglu else H
        self.router = nn.Linear(C, self.E, bias=False)
        # expert weights stacked: (E, in, out), so expert e computes x @ fc[e]
        self.fc = nn.Parameter(torch.empty(self.E, C, H_in))
        self.proj = nn.Parameter(torch.empty(self.E, H, C))
        self.fc_bias = nn.Parameter(torch.zeros(self.E, H_in)) if cfg.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(self.E, C)) if cfg.bias else None
        self.calls: list[MoECall] = []

    def init_experts(self, std: float, proj_std: float) -> None:
        nn.init.normal_(self.fc, std=std)
        nn.init.normal_(self.proj, std=proj_std)

    def expert_weights(self) -> int:
        """Matrix weights of one expert (its slice of fc and proj): what a token routed to it multiplies with."""
        return math.prod(self.fc.shape[1:]) + math.prod(self.proj.shape[1:])

    def expert_params(self) -> int:
        """Parameters of one expert (its slice of fc, proj and their biases)."""
        n = self.expert_weights()
        if self.fc_bias is not None:
            n += self.fc_bias[0].numel() + self.proj_bias[0].numel()
        return n

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        xf = x.reshape(-1, C)  # (N, C)
        N = xf.size(0)
        probs = torch.softmax(self.router(xf).float(), dim=-1)  # (N, E) fp32: the router is tiny, keep it exact
        top_p, top_e = probs.topk(self.k, dim=-1)  # (N, k)
        gates = top_p if self.k == 1 else top_p / top_p.sum(-1, keepdim=True)  # (N, k)

        expert = top_e.reshape(-1)  # (N·k,) assignment → expert
        order = torch.argsort(expert, stable=True)  # group by expert; stable keeps earlier tokens first
        counts = torch.bincount(expert, minlength=self.E)  # (E,)
        token = order // self.k  # (N·k,) sorted assignment → token row
        gate = gates.reshape(-1)[order]  # (N·k,)
        sizes = counts
        dropped = 0
        if self.capacity_factor is not None:
            cap = math.ceil(self.capacity_factor * N * self.k / self.E)
            start = torch.cumsum(counts, 0) - counts  # (E,) first sorted index of each expert
            rank = torch.arange(N * self.k, device=x.device) - start.repeat_interleave(counts)  # rank within expert
            keep = rank < cap
            token, gate = token[keep], gate[keep]
            sizes = counts.clamp(max=cap)
            dropped = int(N * self.k - int(sizes.sum()))

        xs = xf.index_select(0, token)  # (M, C) rows grouped by expert, M = kept assignments
        outs = []
        for e, xe in enumerate(xs.split(sizes.tolist())):  # one matmul per expert (the only sync: the sizes)
            if xe.numel() == 0:
                continue
            h = _expert(self.fc, e, xe)  # (n_e, H or 2H)
            if self.fc_bias is not None:
                h = h + self.fc_bias[e]
            h = _expert(self.proj, e, _activate(h, self.swiglu))  # (n_e, C)
            if self.proj_bias is not None:
                h = h + self.proj_bias[e]
            outs.append(h)
        y = torch.cat(outs) if outs else xs.new_zeros(0, C)  # (M, C)
        y = y * gate.to(y.dtype)[:, None]
        out = torch.zeros(N, C, dtype=y.dtype, device=x.device).index_add_(0, token, y)  # (N, C)

        frac = counts.float() / (N * self.k)  # (E,) f_e, before capacity dropping
        aux = self.E * torch.sum(frac * probs.mean(0))
        self.calls.append(MoECall(aux, counts.detach(), dropped))
        return out.view(B, T, C).to(x.dtype)


def _expert(stack: Tensor | nn.Module, e: int, x: Tensor) -> Tensor:
    """x @ stack[e]: a stacked (E, in, out) parameter, or a quantized stack that computes the same product from its
    packed weights (slmkit.infer.quantized.QuantExperts, which the model layer cannot import)."""
    return x @ stack[e] if isinstance(stack, Tensor) else stack(x, e)


class MoECall:
    """What one MoE layer application reports: the load-balancing term, per-expert assignment counts, drops."""

    __slots__ = ("aux", "counts", "dropped")

    def __init__(self, aux: Tensor, counts: Tensor, dropped: int):
        self.aux, self.counts, self.dropped = aux, counts, dropped


def make_ffn(cfg: ModelConfig) -> nn.Module:
    """The FFN kind chosen by the config: `MoE` when `moe_experts` > 0, else the dense `MLP`."""
    return MoE(cfg) if cfg.moe_experts else MLP(cfg)
