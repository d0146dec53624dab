"""The transformer: one file, read top to bottom.

GPT-2 style (learned positions, LayerNorm, GELU, tied head) and Llama style (RoPE, RMSNorm, SwiGLU, GQA) are settings
of one `ModelConfig`; each swappable part is a small class chosen once in the constructor.

Shapes: B = batch, T = tokens in this call, S = tokens attended to (cache + T), C = n_embd, nh/nkv = query/key heads,
hd = head_dim, V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------------
# positions


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The fixed sin/cos position table of 'Attention Is All You Need'. (n_pos, dim)"""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


class Rotary(nn.Module):
    """RoPE in the 'rotate half' layout used by HF Llama, so exported weights need no permutation."""

    def __init__(self, head_dim: int, max_pos: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # (max_pos, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_pos, hd)
        # not persistent: derived from the config, so checkpoints stay weights-only
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: Tensor, pos: int) -> Tensor:  # x: (B, h, T, hd)
        T = x.size(2)
        cos, sin = self.cos[pos : pos + T].to(x.dtype), self.sin[pos : pos + T].to(x.dtype)  # (T, hd)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static per-layer key/value buffers, preallocated once so decoding does no per-token allocation."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: str = "cpu"):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = 0  # tokens already stored
        self.max_len = max_len

    def reset(self) -> None:
        self.pos = 0


# ---------------------------------------------------------------------------------------------------------------------
# blocks


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v in one matmul: one large GEMM beats three small ones on CPU
        self.qkv = nn.Linear(cfg.n_embd, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.rotary = rotary
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        pos = cache.pos if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        mask, causal = None, True
        if cache is not None:
            cache.k[layer][:B, :, pos : pos + T] = k
            cache.v[layer][:B, :, pos : pos + T] = v
            k, v = cache.k[layer][:B, :, : pos + T], cache.v[layer][:B, :, : pos + T]  # (B, nkv, S, hd)
            if pos > 0:
                causal = False
                if T > 1:  # a chunk after a prefix: row i sees the prefix and chunk tokens <= i
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1, enable_gqa=self.nkv != self.nh,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """GELU (GPT-2) or SwiGLU (Llama). SwiGLU's gate and up projections share one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden or 2*hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            # exact (erf) GELU, not GPT-2's tanh approximation: torch's CPU tanh-GELU kernel measured 5x slower here
            h = F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, rotary)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    """A decoder-only transformer LM. `forward(idx, targets)` → (logits, loss).

    >>> model = GPT(ModelConfig.preset("gpt-0.8m", vocab_size=65))
    >>> logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.pos == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, rotary) for _ in range(cfg.n_layer)])
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2L) so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None, last_only: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 = ignore. Returns logits (B, T|1, V), loss."""
        _B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context of {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[pos : pos + T]
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[pos : pos + T]
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None  # (B, 1 or T, V)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- accounting ---------------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once). non_embedding drops token/position embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 × matmul weights + 12·L·C·T for attention (PaLM App. B)."""
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        T = seq_len or cfg.block_size
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_embd * T

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices; never decay norms, biases or (tied) embeddings' duplicates."""
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() yields a tied weight once
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        dtype = dtype or self.tok_emb.weight.dtype
        return KVCache(self.config, batch_size, max_len or self.config.block_size, dtype, self.tok_emb.weight.device)
