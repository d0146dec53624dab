"""Attention kinds beyond full causal attention (which lives in gpt.py): sliding-window local, block-sparse, linear
(Performer FAVOR+) and LSH (Reformer). Each is chosen by `ModelConfig.attention` and is strictly causal: the output at
position t depends only on tokens ≤ t (tests perturb the future for every kind).

Every kind has two paths that compute the same function:
- a fresh sequence (training, evaluation, the first prefill of a cache) uses the efficient path whose cost the class
  docstring states;
- tokens appended to a KV cache use a dense path: an explicit (T, S) visibility mask over the cached keys (O(S) per
  decoded token, like full attention), or for linear attention a recurrent state (O(1) per token).
Tests check the two paths agree, so the dense mask is also the readable definition of each pattern.

Shapes: B = batch, T = query tokens, S = key tokens, nh/nkv = query/key heads, hd = head_dim, m = random features,
R = hash rounds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit.config import ModelConfig
from slmkit.model.elementwise import rope
from slmkit.model.ffn import make_linear


def project_qkv(m: nn.Module, x: Tensor, pos: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused q/k/v projection shared by the attention kinds, with RoPE applied at position `pos`.

    m has .qkv, .nh, .nkv, .hd and .rotary; x (B, T, C) → q (B, nh, T, hd), k and v (B, nkv, T, hd).
    """
    B, T, _ = x.shape
    q, k, v = m.qkv(x).split([m.nh * m.hd, m.nkv * m.hd, m.nkv * m.hd], dim=-1)
    r = m.rotary
    # under CPU bf16 autocast q and k are rotated in one C pass each, straight out of the projection (elementwise.py)
    qr = None if r is None else rope(q, r.cos, r.sin, pos, m.nh)
    if qr is not None:
        q, k = qr, rope(k, r.cos, r.sin, pos, m.nkv)
    q = q.view(B, T, m.nh, m.hd).transpose(1, 2)
    k = k.view(B, T, m.nkv, m.hd).transpose(1, 2)
    v = v.view(B, T, m.nkv, m.hd).transpose(1, 2)
    if r is not None and qr is None:
        q, k = r(q, pos), r(k, pos)
    return q, k, v


# bf16 sequences up to this length take the explicit path (scores materialised, in query blocks): SDPA's CPU flash
# kernel tiles its bf16 backward badly, and the explicit path is the faster one at every length bench/attention_paths.py
# times (docs/benchmarks.md). Longer sequences still take SDPA for memory: the explicit path keeps the softmax of every
# block for the backward, B·heads·T²/2 values per layer, where SDPA keeps one value per query. fp32 keeps SDPA at every
# length (an explicit fp32 path was slower than SDPA from T=256 on the 2026-11-22 Intel Xeon).
EXPLICIT_MAX_T = {torch.bfloat16: 512}


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal self-attention over a fresh sequence. q (B, nh, T, hd), k/v (B, nkv, T, hd) → (B, nh, T, hd).

    Short bf16 sequences take the explicit path (what bf16 training at small contexts runs); everything else SDPA.
    """
    if q.device.type != "cpu" or q.size(2) > EXPLICIT_MAX_T.get(q.dtype, 0):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1),
                                              dropout_p=dropout_p)
    return explicit_causal_attention(q, k, v, dropout_p)


# the explicit path scores this many query positions at a time (below)
EXPLICIT_BLOCK = 128


def explicit_causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal attention with the scores materialised: q (B, nh, T, hd), k/v (B, nkv, T, hd) → (B, nh, T, hd).

    Queries go in blocks of EXPLICIT_BLOCK positions, each scored against the keys up to its last position only: the
    (T, T) upper triangle that causality masks is mostly never computed, and each block's scores stay small enough
    to sit in cache through the softmax and the product with v (bench/attention_paths.py). Grouped-query heads are
    never copied: the g query heads sharing a key/value head are stacked as rows of one matrix, ordered (position,
    head), so a block of positions is a block of rows.
    """
    B, nh, n, hd = q.shape
    nkv = k.size(1)
    g = nh // nkv
    rows = q.view(B, nkv, g, n, hd).transpose(2, 3).reshape(B * nkv, n * g, hd)  # row t·g + j: head j at position t
    k, v = k.reshape(B * nkv, n, hd), v.reshape(B * nkv, n, hd)
    future = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu(1)  # keys a query may not see
    if g > 1:
        future = future.repeat_interleave(g, dim=0)  # one mask row per row of `rows`
    out = []
    for start in range(0, n, EXPLICIT_BLOCK):
        end = min(n, start + EXPLICIT_BLOCK)
        # whole tensors where a block spans them: a slice would cost a zero-filled copy of its gradient
        whole = start == 0 and end == n
        mask = future if whole else future[start * g : end * g, :end]
        qb = rows if whole else rows[:, start * g : end * g]
        kb, vb = (k, v) if end == n else (k[:, :end], v[:, :end])
        # scale, mask and QKᵀ in one baddbmm; softmax reads bf16 and accumulates in fp32: fewer passes over the
        # scores than an fp32 copy + masked_fill + softmax
        scores = torch.baddbmm(mask.expand(B * nkv, -1, -1), qb, kb.mT, alpha=hd**-0.5)
        p = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
        out.append(p @ vb)
    y = out[0] if len(out) == 1 else torch.cat(out, dim=1)  # (B·nkv, T·g, hd)
    # one copy into (B, T, nh, hd) memory, handed on as the (B, nh, T, hd) view: the caller's transpose back to
    # (B, T, nh·hd) for the output projection is then free
    return y.view(B, nkv, n, g, hd).permute(0, 2, 1, 3, 4).reshape(B, n, nh, hd).transpose(1, 2)


def store_kv(cache: Any, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write this call's keys/values at the cache position; return all cached keys/values (B, nkv, S, hd)."""
    return cache.store(layer, k, v)


def _expand_kv(x: Tensor, nh: int) -> Tensor:
    """(B, nkv, S, hd) → (B, nh, S, hd) for grouped-query attention in the hand-written kernels."""
    return x if x.size(1) == nh else x.repeat_interleave(nh // x.size(1), dim=1)


def _windows(x: Tensor, size: int) -> Tensor:
    """Chunk dim 2 into blocks of `size`, each paired with the block before it.

    x: (..., n·size, d) along dim -2 → (..., n, 2·size, d); block 0's predecessor is zero padding (masked by callers).
    """
    x = F.pad(x, (0, 0, size, 0))  # one block of zeros in front
    return x.unfold(-2, 2 * size, size).transpose(-1, -2)  # (..., n, 2·size, d)


def _pad_to(x: Tensor, mult: int, dim: int = 2) -> Tensor:
    extra = -x.size(dim) % mult
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


class _MaskedAttention(nn.Module):
    """Shared plumbing of the kinds defined by a (query position, key position) visibility rule: the fused q/k/v
    projection (same parameter names as full attention), RoPE, and the cached path (SDPA under that mask)."""

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None, layer: int):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = make_linear(cfg, cfg.n_embd, (self.nh + 2 * self.nkv) * self.hd)
        self.proj = make_linear(cfg, cfg.attn_dim, cfg.n_embd)
        self.rotary = rotary

    def visible(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        """(T,) query positions, (S,) key positions → (T, S) bool: may the query see the key."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The efficient path on a fresh sequence (positions 0..T-1). q (B, nh, T, hd), k/v (B, nkv, T, hd)."""
        raise NotImplementedError

    def forward(self, x: Tensor, cache: Any, layer: int) -> Tensor:
        B, T, _ = x.shape
        pos = cache.pos if cache is not None else 0
        q, k, v = project_qkv(self, x, pos)
        if pos == 0:
            if cache is not None:
                store_kv(cache, layer, k, v)
            y = self.attend(q, k, v)
        else:
            k, v = store_kv(cache, layer, k, v)  # (B, nkv, S, hd)
            S = pos + T
            mask = self.visible(torch.arange(pos, S, device=x.device), torch.arange(S, device=x.device))  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nkv != self.nh)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hd)
        return self.proj(y)


class LocalAttention(_MaskedAttention):
    """Sliding-window causal attention: position t sees keys t-w+1 … t (Longformer's local band, Mistral's SWA).

    Computed in query chunks of w, each against its own and the previous chunk's keys (2w keys per query), so the
    score tensor is (B, nh, T/w, w, 2w).
    Time O(T·w·hd) per head, memory O(T·w) — linear in T for a fixed window (full attention: O(T²) time).
    """

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None, layer: int):
        super().__init__(cfg, rotary, layer)
        self.window = cfg.attn_window
        self.dropout = cfg.dropout

    def visible(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        d = qpos[:, None] - kpos[None, :]
        return (d >= 0) & (d < self.window)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, nh, T, hd = q.shape
        w, p = self.window, self.dropout if self.training else 0.0
        if w >= T:  # the window covers the whole sequence: plain causal attention
            return causal_attention(q, k, v, p)
        n = math.ceil(T / w)
        qc = _pad_to(q, w).view(B, nh, n, w, hd).transpose(1, 2)  # (B, n, nh, w, hd)
        kc = _windows(_pad_to(k, w), w).transpose(1, 2)  # (B, n, nkv, 2w, hd)
        vc = _windows(_pad_to(v, w), w).transpose(1, 2)  # (B, n, nkv, 2w, hd)
        r = torch.arange(w, device=q.device)
        qpos = torch.arange(n, device=q.device)[:, None] * w + r  # (n, w)
        kpos = qpos[:, :1] - w + torch.arange(2 * w, device=q.device)  # (n, 2w)
        d = qpos[:, :, None] - kpos[:, None, :]  # (n, w, 2w)
        mask = ((d >= 0) & (d < w) & (kpos[:, None, :] >= 0))[:, None]  # (n, 1, w, 2w)
        y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, enable_gqa=self.nkv != nh, dropout_p=p)
        return y.transpose(1, 2).reshape(B, nh, n * w, hd)[:, :, :T]  # (B, nh, T, hd)

    def keys_per_query(self, T: int) -> float:
        return min(T, self.window)


class BlockSparseAttention(_MaskedAttention):
    """Block-sparse causal attention (Sparse Transformer "fixed" pattern + Longformer global tokens).

    Position t in block i = t // b sees: every earlier-or-equal position of blocks i-1 and i (the local part); the
    first g positions of the sequence (global tokens); and the last c positions of every earlier block ("summary"
    columns, which carry information across blocks in one hop). Keys are gathered as a local (2b) and a global
    (g + c·T/b) set and share one softmax.
    Time O(T·(2b + g + c·T/b)·hd) per head, memory O(T·(2b + g + c·T/b)); with b ≈ √(c·T) that is O(T^1.5)
    (Child et al. 2019), and for a fixed block size the summary term is quadratic with a small constant c/b.
    """

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None, layer: int):
        super().__init__(cfg, rotary, layer)
        self.b, self.g, self.c = cfg.attn_block, cfg.attn_global, cfg.attn_summary

    def _is_global(self, pos: Tensor) -> Tensor:
        return (pos < self.g) | (pos % self.b >= self.b - self.c)

    def visible(self, qpos: Tensor, kpos: Tensor) -> Tensor:
        causal = kpos[None, :] <= qpos[:, None]
        local = kpos[None, :] // self.b >= qpos[:, None] // self.b - 1
        return causal & (local | self._is_global(kpos)[None, :])

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, nh, T, hd = q.shape
        b, dev = self.b, q.device
        n = math.ceil(T / b)
        k, v = _expand_kv(k, nh), _expand_kv(v, nh)
        qc = _pad_to(q, b).view(B, nh, n, b, hd)  # (B, nh, n, b, hd)
        kl, vl = _windows(_pad_to(k, b), b), _windows(_pad_to(v, b), b)  # (B, nh, n, 2b, hd)
        gpos = torch.arange(T, device=dev)
        gpos = gpos[self._is_global(gpos)]  # (G,) global key positions
        kg, vg = k[:, :, gpos], v[:, :, gpos]  # (B, nh, G, hd)

        qpos = torch.arange(n, device=dev)[:, None] * b + torch.arange(b, device=dev)  # (n, b)
        kpos = qpos[:, :1] - b + torch.arange(2 * b, device=dev)  # (n, 2b)
        local_mask = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] >= 0)  # (n, b, 2b)
        # a global key is used only before the local part begins, so no key is counted twice
        global_mask = (gpos[None, :] < qpos[:, :1] - b)[:, None, :].expand(n, b, -1)  # (n, b, G)
        mask = torch.cat([local_mask, global_mask], dim=-1)  # (n, b, 2b + G)

        scale = 1.0 / math.sqrt(hd)
        s = torch.cat([qc @ kl.transpose(-1, -2), qc @ kg[:, :, None].transpose(-1, -2)], dim=-1) * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)  # (B, nh, n, b, 2b + G)
        y = p[..., : 2 * b] @ vl + p[..., 2 * b :] @ vg[:, :, None]  # (B, nh, n, b, hd)
        return y.reshape(B, nh, n * b, hd)[:, :, :T]

    def keys_per_query(self, T: int) -> float:
        return min(T, 2 * self.b + self.g + self.c * T / self.b)


def orthogonal_features(m: int, d: int, seed: int) -> Tensor:
    """Performer's orthogonal random features: m rows of dimension d, orthogonal within each block of d, with
    Gaussian-distributed lengths (so each row is marginally N(0, I_d)). (m, d)"""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g))
        # sign fix: LAPACK's Q alone is not uniformly distributed over rotations, which biases the kernel estimate
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    w = torch.cat(blocks)[:m]  # (m, d) unit rows
    return w * torch.randn(m, d, generator=g).norm(dim=1, keepdim=True)


class LinearAttention(nn.Module):
    """Causal linear attention with Performer FAVOR+ positive random features (Choromanski et al. 2021).

    softmax(q·k/√d) ≈ φ(q)·φ(k) with φ(x) = exp(W·x − |x|²/2) on x scaled by d^-¼ and m orthogonal random rows W.
    Causality is a prefix sum over keys: y_t = φ(q_t)·Σ_{j≤t} φ(k_j)v_jᵀ / φ(q_t)·Σ_{j≤t} φ(k_j). It is computed in
    chunks of L = 64: exact masked products inside a chunk, plus the running state (m × hd) of all earlier chunks, so
    memory stays O(T·(m + L) + T/L·m·hd) instead of materialising a per-position state.
    Time O(T·m·hd) per head, memory O(T·m): linear in T.

    Numerics: a query's features are divided by their own max (cancels between numerator and denominator); keys use the
    data-independent bound W·x − |x|²/2 ≤ |W|²/2, so no stabiliser ever depends on other (e.g. future) tokens.
    Features are drawn from `feature_seed` (a buffer, saved with the weights) so evaluation is deterministic; with
    `linear_redraw` = n > 0 they are redrawn (seed + 1) every n training forward passes, as in the paper.
    Decoding keeps the running state in the cache: O(m·hd) per token, independent of the context length.
    """

    CHUNK = 64

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None, layer: int):
        super().__init__()
        self.nh, self.nkv, self.hd, self.m = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.linear_features
        self.qkv = make_linear(cfg, cfg.n_embd, (self.nh + 2 * self.nkv) * self.hd)
        self.proj = make_linear(cfg, cfg.attn_dim, cfg.n_embd)
        self.rotary = rotary
        self.redraw = cfg.linear_redraw
        seed = 1_000_003 * (layer + 1)
        self.register_buffer("feature_seed", torch.tensor([seed], dtype=torch.long))
        self.register_buffer("features", orthogonal_features(self.m, self.hd, seed))
        self.register_buffer("train_calls", torch.zeros(1, dtype=torch.long))

    def _maybe_redraw(self) -> None:
        self.train_calls += 1
        if int(self.train_calls) % self.redraw == 0:
            self.feature_seed += 1
            self.features.copy_(orthogonal_features(self.m, self.hd, int(self.feature_seed)))

    def _phi(self, x: Tensor, is_query: bool) -> Tensor:
        """(B, nh, T, hd) fp32 → positive features (B, nh, T, m)."""
        x = x * self.hd**-0.25
        w = self.features.float()
        u = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)  # (B, nh, T, m)
        # queries: own max (cancels in the ratio); keys: the bound W·x − |x|²/2 ≤ |W|²/2, independent of the data
        stabiliser = u.amax(-1, keepdim=True).detach() if is_query else 0.5 * (w * w).sum(-1).max()
        return torch.exp(u - stabiliser)

    def forward(self, x: Tensor, cache: Any, layer: int) -> Tensor:
        B, T, _ = x.shape
        if self.redraw and self.training:
            self._maybe_redraw()
        pos = cache.pos if cache is not None else 0
        q, k, v = project_qkv(self, x, pos)
        state = tuple(s[:B] for s in cache.state[layer]) if cache is not None and pos > 0 else None
        # fp32 throughout: exp features and long running sums lose too much in bf16
        with torch.autocast("cpu", enabled=False):
            y, state = self._causal(self._phi(q.float(), True), self._phi(_expand_kv(k, self.nh).float(), False),
                                    _expand_kv(v, self.nh).float(), state)
        if cache is not None:  # in place: the cache's buffers are what a fused decode step reads (KVCache)
            for buf, s in zip(cache.state[layer], state, strict=True):
                buf[:B].copy_(s)
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hd)
        return self.proj(y)

    def _causal(self, qf: Tensor, kf: Tensor, v: Tensor, state: tuple[Tensor, Tensor] | None):
        """Chunked causal prefix sums. qf/kf (B, nh, T, m), v (B, nh, T, hd); state = (Σφ(k)vᵀ (B, nh, m, hd),
        Σφ(k) (B, nh, m)) of earlier tokens. Returns y (B, nh, T, hd) and the state including these T tokens."""
        B, nh, T, m = qf.shape
        L = min(self.CHUNK, T)
        n = math.ceil(T / L)
        qc = _pad_to(qf, L).view(B, nh, n, L, m)
        kc = _pad_to(kf, L).view(B, nh, n, L, m)  # zero padding: padded keys add nothing
        vc = _pad_to(v, L).view(B, nh, n, L, self.hd)
        kv = kc.transpose(-1, -2) @ vc  # (B, nh, n, m, hd) per-chunk Σφ(k)vᵀ
        ks = kc.sum(3)  # (B, nh, n, m)
        if state is None:
            state = (qf.new_zeros(B, nh, m, self.hd), qf.new_zeros(B, nh, m))
        # exclusive prefix over chunks (chunk i sees chunks < i), seeded with the carried state
        S = torch.cat([state[0][:, :, None], kv], dim=2).cumsum(2)  # (B, nh, n+1, m, hd)
        z = torch.cat([state[1][:, :, None], ks], dim=2).cumsum(2)  # (B, nh, n+1, m)
        a = (qc @ kc.transpose(-1, -2)).tril()  # (B, nh, n, L, L) causal inside the chunk
        num = a @ vc + qc @ S[:, :, :-1]  # (B, nh, n, L, hd)
        den = a.sum(-1) + (qc * z[:, :, :-1, None]).sum(-1)  # (B, nh, n, L)
        y = num / den.clamp_min(1e-30)[..., None]
        return y.reshape(B, nh, n * L, self.hd)[:, :, :T], (S[:, :, -1], z[:, :, -1])

    def keys_per_query(self, T: int) -> float:
        # per token and head: features (2·m·hd), state update and read (2·m·hd), in-chunk products (L·(m + hd));
        # expressed as the number of keys full attention would touch for the same multiply-adds (2·hd per key)
        L = min(self.CHUNK, T)
        return 2 * self.m + L * (self.m + self.hd) / (2 * self.hd)


class LSHAttention(nn.Module):
    """Causal LSH attention in the style of Reformer (Kitaev et al. 2020).

    Shared-QK: keys are the unit-normalised queries (one projection fewer: `qv` maps C → 2C). Each of R hash rounds
    buckets every key by a random rotation (argmax over [xR; −xR], n_buckets/2 rotations), sorts positions by
    (bucket, position) and lets each query attend to the L most recent keys of its own bucket (itself included),
    computed as chunks of L in sorted order, each against itself and the previous chunk. A query sees its own key only
    when nothing else is visible (its score is replaced by −10⁴, as in Reformer, because q·q̂ would dominate). Rounds
    are combined by their log-sum-exp weights. (Unlike Reformer, a key found by several rounds is not de-duplicated.)

    Strict causality: Reformer's fixed chunk boundaries in sorted order depend on how many *later* tokens fall into
    lower buckets; here the window is "the last L same-bucket tokens", which depends only on tokens ≤ t.
    Rotations are fixed buffers drawn from a per-layer seed, so evaluation is deterministic.
    Time O(R·T·(L·hd + log T)) per head, memory O(R·T·L).
    """

    def __init__(self, cfg: ModelConfig, rotary: nn.Module | None, layer: int):
        super().__init__()
        self.nh, self.hd = cfg.n_head, cfg.head_dim
        self.L, self.R, self.n_buckets = cfg.attn_window, cfg.lsh_hashes, cfg.lsh_buckets
        self.qv = make_linear(cfg, cfg.n_embd, 2 * cfg.attn_dim)
        self.proj = make_linear(cfg, cfg.attn_dim, cfg.n_embd)
        self.rotary = rotary
        g = torch.Generator().manual_seed(7_000_003 * (layer + 1))
        self.register_buffer("rotations", torch.randn(self.R, self.hd, self.n_buckets // 2, generator=g))

    SELF_SCORE = -1e4

    def _buckets(self, k: Tensor) -> Tensor:
        """(B, nh, S, hd) → (B, nh, R, S) bucket ids."""
        r = torch.einsum("bhsd,rdn->bhrsn", k.float(), self.rotations)  # (B, nh, R, S, n_buckets/2)
        return torch.cat([r, -r], dim=-1).argmax(-1)

    def forward(self, x: Tensor, cache: Any, layer: int) -> Tensor:
        B, T, _ = x.shape
        q, v = self.qv(x).chunk(2, dim=-1)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.nh, self.hd).transpose(1, 2)
        pos = cache.pos if cache is not None else 0
        if self.rotary is not None:
            q = self.rotary(q, pos)
        k = F.normalize(q, dim=-1)  # shared-QK keys
        if pos == 0:
            if cache is not None:
                store_kv(cache, layer, k, v)
            y = self._sorted(q, k, v)
        else:
            k, v = store_kv(cache, layer, k, v)
            y = self._dense(q, k, v, pos)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.proj(y)

    def _combine(self, o: Tensor, lse: Tensor) -> Tensor:
        """o (B, nh, R, T, hd), lse (B, nh, R, T) → (B, nh, T, hd): each round weighted by its share of the mass."""
        w = torch.softmax(lse, dim=2)
        return (o * w[..., None].to(o.dtype)).sum(2)

    def _sorted(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Efficient path on positions 0..T-1."""
        B, nh, T, hd = q.shape
        L, R, dev = self.L, self.R, q.device
        buckets = self._buckets(k)  # (B, nh, R, T)
        perm = torch.argsort(buckets * T + torch.arange(T, device=dev), dim=-1)  # (B, nh, R, T) unique keys
        sb = buckets.gather(-1, perm)  # sorted buckets

        def sort(x: Tensor) -> Tensor:  # (B, nh, T, hd) → (B, nh, R, T, hd) in each round's sorted order
            return x[:, :, None].expand(B, nh, R, T, hd).gather(3, perm[..., None].expand(B, nh, R, T, hd))

        sq, sk, sv = sort(q), sort(k), sort(v)
        n = math.ceil(T / L)
        qc = _pad_to(sq, L, dim=3).view(B, nh, R, n, L, hd)
        kc, vc = _windows(_pad_to(sk, L, dim=3), L), _windows(_pad_to(sv, L, dim=3), L)  # (B, nh, R, n, 2L, hd)
        sb = F.pad(sb, (0, -T % L), value=-1)  # padding never shares a bucket
        bq = sb.view(B, nh, R, n, L)
        bk = F.pad(sb, (L, 0), value=-1).unfold(-1, 2 * L, L)  # (B, nh, R, n, 2L)
        r = torch.arange(L, device=dev)[:, None]
        c = torch.arange(2 * L, device=dev)[None, :]
        window = (c > r) & (c <= r + L)  # (L, 2L): the L sorted slots ending at the query
        mask = window & (bq[..., :, None] == bk[..., None, :])  # (B, nh, R, n, L, 2L)
        s = qc @ kc.transpose(-1, -2)  # (B, nh, R, n, L, 2L)
        s = torch.where(c == r + L, torch.full_like(s, self.SELF_SCORE), s).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (B, nh, R, n, L)
        o = torch.exp(s - lse[..., None]) @ vc  # (B, nh, R, n, L, hd)
        o = o.reshape(B, nh, R, n * L, hd)[:, :, :, :T]
        lse = lse.reshape(B, nh, R, n * L)[..., :T]
        # back to original positions
        o = torch.empty_like(o).scatter_(3, perm[..., None].expand(B, nh, R, T, hd), o)
        lse = torch.empty_like(lse).scatter_(3, perm, lse)
        return self._combine(o, lse)

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        """Cached path: T new queries at positions pos.. against all S cached keys, under the same visibility rule."""
        S, dev = k.size(2), q.device
        T = q.size(2)
        bk = self._buckets(k)  # (B, nh, R, S)
        bq = bk[..., pos:]  # the new queries' keys are the last T cached ones (shared-QK)
        qpos, kpos = torch.arange(pos, pos + T, device=dev), torch.arange(S, device=dev)
        same = (bq[..., :, None] == bk[..., None, :]) & (kpos <= qpos[:, None])  # (B, nh, R, T, S)
        rank = same.flip(-1).cumsum(-1).flip(-1)  # same-bucket keys in [key, query]: 1 for the newest
        mask = same & (rank <= self.L)
        s = (q @ k.transpose(-1, -2))[:, :, None]  # (B, nh, 1, T, S)
        is_self = kpos[None, :] == qpos[:, None]  # (T, S)
        s = torch.where(is_self, torch.full_like(s, self.SELF_SCORE), s).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (B, nh, R, T)
        o = torch.exp(s - lse[..., None]) @ v[:, :, None]  # (B, nh, R, T, hd)
        return self._combine(o, lse)

    def keys_per_query(self, T: int) -> float:
        return min(T, 2 * self.L) * self.R


# kinds whose cached decoding reads only a recurrent state (KVCache.state), never cached keys/values: their cache
# allocates no key/value buffers
STATE_ONLY_KINDS = frozenset({"linear"})

ATTENTION_KINDS: dict[str, type[nn.Module]] = {
    "local": LocalAttention,
    "blocksparse": BlockSparseAttention,
    "linear": LinearAttention,
    "lsh": LSHAttention,
}
