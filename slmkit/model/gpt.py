"""The transformer: one file, read top to bottom.

GPT-2 style (learned positions, LayerNorm, GELU, tied head) and Llama style (RoPE, RMSNorm, SwiGLU, GQA) are settings
of one `ModelConfig`; each swappable part is a small class chosen once in the constructor. Full attention lives here;
the other attention kinds (local, block-sparse, linear, LSH) are in attention.py, the FFN kinds (dense MLP, MoE) and
low-rank linears in ffn.py. FFN sharing and block sharing keep one module per shared part.

Shapes: B = batch, T = tokens in this call, S = tokens attended to (cache + T), C = n_embd, nh/nkv = query/key heads,
hd = head_dim, V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.model.attention import ATTENTION_KINDS, STATE_ONLY_KINDS, causal_attention, project_qkv, store_kv
from slmkit.model.elementwise import RMSNorm
from slmkit.model.ffn import LowRankLinear, MoE, make_ffn, make_linear
from slmkit.model.loss import cross_entropy, linear_cross_entropy

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
        self.shape = (head_dim, max_pos, theta)
        # not persistent: derived from the config, so checkpoints stay weights-only
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.build()

    def build(self, device: torch.device | str | None = None) -> None:
        head_dim, max_pos, theta = self.shape
        with torch.device(device or torch.get_default_device()):
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # (max_pos, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (max_pos, hd)
            self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, x: Tensor, pos: int) -> Tensor:  # x: (B, h, T, hd)
        T = x.size(2)
        cos, sin = self.cos[pos : pos + T].to(x.dtype), self.sin[pos : pos + T].to(x.dtype)  # (T, hd)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------------------------------------------------------------
# KV cache


KV_DTYPES = ("fp32", "bf16", "int8")  # what a KV cache can store: `new_cache(kv=...)`, `slm generate --kv-cache`


class KVCache:
    """Static per-layer key/value buffers, preallocated once so decoding does no per-token allocation, holding only
    what the attention kind reads: keys and values (B, nkv, max_len, hd) per layer, or for linear attention, whose
    decoding reads a recurrent state instead, empty (B, nkv, 0, hd) buffers and the state.

    `kv` is the storage: "fp32" (the model's dtype), "bf16" (half the bytes; llama.cpp keeps f16), or "int8" (a
    quarter, plus one fp32 scale per position and head: k_scale/v_scale (B, nkv, max_len), the largest |value| of
    the row maps to 127). Past about a thousand positions the cache, not the weights, is most of what a decode step
    reads, so its width sets the speed there. Attention computes in the model's dtype from what was stored. Linear
    attention keeps no keys/values (its recurrent state stays fp32); LSH attention refuses a rounded
    cache.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: str = "cpu",
                 kv: str = "fp32"):
        if kv not in KV_DTYPES:
            raise SlmError(f"kv cache {kv!r} is not one of {', '.join(KV_DTYPES)}")
        if kv != "fp32" and cfg.attention == "lsh":
            # rounding moves keys across buckets: a large logit change, not a small one (docs/benchmarks.md)
            raise SlmError("LSH attention hashes the cached keys into buckets, and a rounded cache moves keys "
                           "across buckets: use kv='fp32'")
        # empty rather than absent: code that copies or slices caches layer by layer works unchanged
        kv_len = 0 if cfg.attention in STATE_ONLY_KINDS else max_len
        shape = (batch_size, cfg.n_kv_head, kv_len, cfg.head_dim)
        store = {"fp32": dtype, "bf16": torch.bfloat16, "int8": torch.int8}[kv]
        self.kv, self.dtype = kv, dtype
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(cfg.n_layer)]
        n = cfg.n_layer if kv == "int8" else 0
        self.k_scale = [torch.zeros(shape[:3], device=device) for _ in range(n)]
        self.v_scale = [torch.zeros(shape[:3], device=device) for _ in range(n)]
        # linear attention's recurrent state per layer, allocated up front like the keys/values so that decoding
        # (fused.py's C step too) updates it in place: (Σφ(k)vᵀ (B, nh, m, hd), Σφ(k) (B, nh, m)), fp32 whatever the
        # model's dtype (long running sums lose too much in bf16); None for the other kinds
        self.state: list = [None] * cfg.n_layer
        if cfg.attention in STATE_ONLY_KINDS:
            shape = (batch_size, cfg.n_head, cfg.linear_features)
            self.state = [(torch.zeros(*shape, cfg.head_dim, device=device), torch.zeros(shape, device=device))
                          for _ in range(cfg.n_layer)]
        self.pos = 0  # tokens already stored
        self.max_len = max_len

    def reset(self) -> None:
        self.pos = 0

    def slot(self, b: int) -> KVCache:
        """Sequence `b` of this batch cache as a batch-1 cache over the same storage: what it stores lands in row b
        of these buffers (so a batched decode step sees it), recurrent state included, with its own position. A server
        keeps one per running request and prefills through it (slmkit.serve)."""
        if not 0 <= b < self.k[0].size(0):
            raise IndexError(f"slot {b} is outside the cache's {self.k[0].size(0)} sequences")
        view = object.__new__(KVCache)
        view.kv, view.dtype, view.max_len, view.pos = self.kv, self.dtype, self.max_len, 0
        view.k, view.v = [t[b : b + 1] for t in self.k], [t[b : b + 1] for t in self.v]
        view.k_scale, view.v_scale = [t[b : b + 1] for t in self.k_scale], [t[b : b + 1] for t in self.v_scale]
        view.state = [None if s is None else (s[0][b : b + 1], s[1][b : b + 1]) for s in self.state]
        return view

    @property
    def rewindable(self) -> bool:
        """Whether moving `pos` back keeps what the cache holds before it valid: true for keys/values (positions
        after `pos` are overwritten), false for a recurrent state, which sums every position it was given."""
        return all(s is None for s in self.state)

    def nbytes(self) -> int:
        """Bytes held: key/value buffers and their scales, plus any recurrent state."""
        tensors = [*self.k, *self.v, *self.k_scale, *self.v_scale,
                   *(t for s in self.state if s is not None for t in s)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this call's keys/values (B, nkv, T, hd) at `pos`; return all cached keys/values (B, nkv, pos + T,
        hd) in the model's dtype: views of the buffers for "fp32", decoded copies otherwise."""
        B, pos, T = k.size(0), self.pos, k.size(2)
        out = []
        for buf, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if self.kv == "int8":
                q, scale = int8_rows(x)
                buf[layer][:B, :, pos : pos + T] = q
                scales[layer][:B, :, pos : pos + T] = scale
                stored = buf[layer][:B, :, : pos + T].to(self.dtype) * scales[layer][:B, :, : pos + T, None]
            else:
                buf[layer][:B, :, pos : pos + T] = x
                stored = buf[layer][:B, :, : pos + T]
            out.append(stored.to(self.dtype))
        return out[0], out[1]


def int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dim: (q, scale) with x ≈ q · scale[..., None], |q| ≤ 127 — the rule
    kernels.c applies to the cache rows it writes."""
    amax = x.detach().abs().amax(-1).float()
    scale = amax / 127
    q = torch.where(amax[..., None] > 0, x.float() * (127 / amax.clamp_min(1e-30))[..., None], 0.0)
    return q.round().clamp(-127, 127).to(torch.int8), scale


# ---------------------------------------------------------------------------------------------------------------------
# blocks


def make_norm(cfg: ModelConfig, bf16_out: bool = False) -> nn.Module:
    """RMSNorm or LayerNorm. bf16_out: an RMSNorm that feeds a linear, so under CPU bf16 autocast its output may be
    bf16 from one C pass (slmkit/model/elementwise.py)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps, bf16_out=bf16_out)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k and v in one matmul: one large GEMM beats three small ones on CPU
        self.qkv = make_linear(cfg, cfg.n_embd, (self.nh + 2 * self.nkv) * self.hd)
        self.proj = make_linear(cfg, cfg.attn_dim, cfg.n_embd)
        self.rotary = rotary
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        pos = cache.pos if cache is not None else 0
        q, k, v = project_qkv(self, x, pos)
        if cache is not None:
            cached_k, cached_v = store_kv(cache, layer, k, v)  # (B, nkv, S, hd): the prefix and this call
        if pos == 0:  # a fresh sequence: training, evaluation, the first prefill
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        else:
            k, v = cached_k, cached_v
            # a chunk after a prefix: row i sees the prefix and chunk tokens <= i (one decoded token sees all)
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos) if T > 1 else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hd)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm block. The attention kind (full here; local/blocksparse/linear/lsh in attention.py) and the FFN kind
    (dense MLP or MoE, ffn.py) are chosen once, from the config."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary | None, layer: int = 0, shared_mlp: nn.Module | None = None):
        super().__init__()
        # a norm's output may come in bf16 (make_norm) where the next part only feeds it to linears
        self.norm1 = make_norm(cfg, bf16_out=cfg.attention == "full")
        if cfg.attention == "full":
            self.attn = Attention(cfg, rotary)
        else:
            self.attn = ATTENTION_KINDS[cfg.attention](cfg, rotary, layer)
        self.norm2 = make_norm(cfg, bf16_out=not cfg.moe_experts)
        if shared_mlp is None:
            self.mlp = make_ffn(cfg)
        else:  # not a submodule of the block: GPT.shared_mlp owns it, so it is stored, counted and decayed once
            object.__setattr__(self, "mlp", shared_mlp)
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
        # sharing (MobiLlama's one FFN for all layers; share_blocks unique blocks cycled over the layers) keeps one
        # module per shared part, so parameters(), state_dict() and checkpoints hold each weight once
        self.shared_mlp = make_ffn(cfg) if cfg.share_mlp else None
        n_unique = cfg.share_blocks or cfg.n_layer
        self.blocks = nn.ModuleList([Block(cfg, rotary, i, self.shared_mlp) for i in range(n_unique)])
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2L) so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, LowRankLinear):
                m.init_factors(resid_std if name.endswith("proj") else cfg.init_std)
            elif isinstance(m, MoE):
                m.init_experts(cfg.init_std, resid_std)
        # MoE layers report each application (aux loss, expert counts) into one list the model reads after forward
        self.aux_loss: Tensor | None = None  # MoE load-balancing term of the last forward (the trainer adds it)
        self._moe_calls: list | None = None
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        if moes:
            self._moe_calls = []
            for m in moes:
                m.calls = self._moe_calls

    def build_buffers(self, device: torch.device | str = "cpu") -> None:
        """Compute the derived, non-persistent buffers (RoPE tables, sinusoidal positions) on `device`: for a model
        built on the meta device whose weights were then loaded with `load_state_dict(..., assign=True)`."""
        if self.config.pos == "sinusoidal":
            self.pos_table = sinusoidal_table(self.config.block_size, self.config.n_embd).to(device)
        for m in self.modules():
            if isinstance(m, Rotary):
                m.build(device)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None, last_only: bool = False,
        return_logits: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 = ignore. Returns (logits (B, T|1, V), None)
        without targets; with them (logits, loss), or, when the head is frozen (LoRA), (None, loss): the head and the
        loss then run together a chunk of rows at a time (slmkit.model.loss.linear_cross_entropy), no (B, T, V)
        logits made. return_logits=True always returns the logits."""
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
        if self._moe_calls is not None:
            self._moe_calls.clear()
        n_unique = len(self.blocks)
        for i in range(self.config.n_layer):
            x = self.blocks[i % n_unique](x, cache, i)
        if self._moe_calls is not None:
            # kept out of the returned loss so evaluation reports the LM cross-entropy only
            self.aux_loss = self.config.moe_aux_loss_coef * sum(c.aux for c in self._moe_calls)
        if cache is not None:
            cache.pos += T
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None  # (B, 1 or T, V)
        head = self.lm_head
        # fused only for a frozen head (LoRA, frozen bodies): with a trained one the chunked weight gradient measured
        # slower than the logits path at SmolLM2's vocabulary (docs/benchmarks.md); a quantized head: its own forward
        if return_logits or type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
            logits = head(x)  # (B, T, V)
            return logits, cross_entropy(logits, targets)
        return None, linear_cross_entropy(x, head.weight, targets)

    # --- accounting ---------------------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Unique parameters (a tied head and shared modules count once). non_embedding drops token/position
        embedding tables. active counts what one token uses in each MoE layer: k of its E experts (plus the router)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        if active:
            n -= sum((m.E - m.k) * m.expert_params() for m in self.modules() if isinstance(m, MoE))
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM App. B: 6 × the matmul weights a token passes through
        (each layer's use of a shared module counts; an MoE layer counts its router and k experts) + 12·L·A·S for
        attention scores, A = n_head·head_dim (n_embd unless heads were pruned), S = keys per query: T for full
        attention, the kind's own (approximate) figure otherwise."""
        cfg = self.config
        T = seq_len or cfg.block_size

        def linear_weights(m: nn.Module) -> int:
            n = sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Linear))  # includes MoE routers
            n += sum(x.k * x.expert_weights() for x in m.modules() if isinstance(x, MoE))
            return n

        matmul, span = self.lm_head.weight.numel(), 0.0
        for i in range(cfg.n_layer):
            block = self.blocks[i % len(self.blocks)]
            matmul += linear_weights(block.attn) + linear_weights(block.mlp)
            span += block.attn.keys_per_query(T) if hasattr(block.attn, "keys_per_query") else T
        return int(6 * matmul + 12 * cfg.attn_dim * span)

    def moe_stats(self) -> dict | None:
        """Routing of the last forward pass, per MoE layer application (None for dense models): `expert_util` = the
        fraction of token→expert assignments each expert received, `dropped` = fraction dropped by the capacity limit,
        `aux` = the unweighted load-balancing term (1.0 = perfectly balanced)."""
        if not self._moe_calls:
            return None
        util = [(c.counts.float() / c.counts.sum()).tolist() for c in self._moe_calls]
        total = sum(int(c.counts.sum()) for c in self._moe_calls)
        return {"expert_util": [[round(u, 4) for u in layer] for layer in util],
                "dropped": sum(c.dropped for c in self._moe_calls) / total,
                "aux": float(sum(c.aux.detach() for c in self._moe_calls)) / len(self._moe_calls)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Parameters by kind, for optimizers that treat them differently (each once, a tied weight included):
        matrix — 2-D weights inside the blocks (what Muon orthogonalizes), decayed; embedding — token/position tables,
        an untied head, MoE expert stacks and routers, decayed; vector — norms and biases, never decayed."""
        groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embedding": [], "vector": []}
        for name, p in self.named_parameters():  # yields a tied weight once
            if p.dim() < 2:
                groups["vector"].append(p)
            elif p.dim() == 2 and name.startswith(("blocks.", "shared_mlp.")) and ".router." not in name:
                groups["matrix"].append(p)
            else:
                groups["embedding"].append(p)
        return [{"params": ps, "weight_decay": 0.0 if kind == "vector" else weight_decay, "kind": kind}
                for kind, ps in groups.items() if ps]

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  kv: str = "fp32") -> KVCache:
        """A cache for `batch_size` sequences of up to `max_len` tokens (default: the context), storing keys and
        values as `kv` (KVCache)."""
        dtype = dtype or self.tok_emb.weight.dtype
        return KVCache(self.config, batch_size, max_len or self.config.block_size, dtype, self.tok_emb.weight.device,
                       kv)
