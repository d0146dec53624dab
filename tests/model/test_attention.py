"""Attention kinds: shapes, strict causality for every kind, the efficient path against each kind's dense definition,
KV-cache decoding against recomputation, FAVOR+ against exact softmax attention, and the config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer import SamplingParams, generate
from slmkit.model import GPT
from slmkit.model.attention import (
    EXPLICIT_MAX_T,
    BlockSparseAttention,
    LinearAttention,
    LocalAttention,
    LSHAttention,
    causal_attention,
)

KINDS = ["full", "local", "blocksparse", "linear", "lsh"]
SMALL = dict(attn_window=8, attn_block=8, attn_global=2, attn_summary=1, linear_features=16, lsh_buckets=4)


def tiny(kind: str, pos: str = "rope", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_kv_head=4 if kind == "lsh" else 2,
                      n_embd=32, pos=pos, attention=kind, **{**SMALL, **kw})
    return GPT(cfg).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_initial_loss(kind):
    m = tiny(kind)
    x = torch.randint(0, 61, (3, 40))
    logits, loss = m(x, torch.randint(0, 61, (3, 40)), return_logits=True)
    assert logits.shape == (3, 40, 61)
    assert abs(loss.item() - math.log(61)) < 0.5


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("kind", KINDS)
def test_strictly_causal(kind, pos):
    """Changing tokens t+1..T never changes the logits at positions <= t (checked at several t, across chunk and
    block boundaries, for sequences longer than every window)."""
    m = tiny(kind, pos)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 61, (2, 45), generator=g)
    ref, _ = m(x)
    for t in (0, 7, 8, 17, 30, 43):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, 61, (2, 44 - t), generator=g)
        out, _ = m(y)
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :])


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_matches_full_forward(kind):
    """Prefill (efficient path), a chunk after a prefix and single tokens (cached path) == one full forward."""
    m = tiny(kind)
    x = torch.randint(0, 61, (2, 45))
    full, _ = m(x)
    cache = m.new_cache(2)
    parts = [m(x[:, :10], cache=cache)[0], m(x[:, 10:21], cache=cache)[0]]
    parts += [m(x[:, t : t + 1], cache=cache)[0] for t in range(21, 45)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv, tol", [("bf16", 0.005), ("int8", 0.01)])
@pytest.mark.parametrize("kind", ["full", "local", "blocksparse"])
def test_narrow_kv_cache_stays_close_to_the_full_forward(kind, kv, tol):
    """A bf16/int8 cache rounds what it stores, so cached decoding is close to, not equal to, one full forward."""
    m = tiny(kind)
    with torch.no_grad():
        for w in m.parameters():
            if w.dim() > 1:
                w.normal_(0, 0.2)
    x = torch.randint(0, 61, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full, _ = m(x)
        cache = m.new_cache(2, kv=kv)
        parts = [m(x[:, :10], cache=cache)[0], m(x[:, 10:21], cache=cache)[0]]
        parts += [m(x[:, t : t + 1], cache=cache)[0] for t in range(21, 45)]
    err = ((torch.cat(parts, dim=1) - full).norm() / full.norm()).item()
    assert 0 < err < tol
    assert cache.k[0].dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kv]


def test_int8_cache_rows_round_to_their_scale():
    from slmkit.model.gpt import int8_rows

    x = torch.randn(3, 2, 5, 16) * torch.logspace(-6, 3, 5)[:, None]
    x[0, 0, 0] = 0  # an all-zero row: scale 0, zeros back
    q, scale = int8_rows(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:3] and q.abs().max() == 127
    back = q.float() * scale[..., None]
    assert ((back - x).abs() <= scale[..., None] / 2 * (1 + 1e-5)).all()
    assert (back[0, 0, 0] == 0).all() and scale[0, 0, 0] == 0


def test_kv_cache_sizes_and_bad_kind():
    m = tiny("full")
    c = m.config
    fp32 = m.new_cache(2).nbytes()
    assert m.new_cache(2, kv="bf16").nbytes() == fp32 // 2
    rows = 2 * c.n_layer * 2 * c.n_kv_head * c.block_size  # (k, v) × layers × batch × heads × positions
    assert m.new_cache(2, kv="int8").nbytes() == fp32 // 4 + rows * 4  # + one fp32 scale per row
    with pytest.raises(SlmError, match="not one of fp32, bf16, int8"):
        m.new_cache(1, kv="fp8")
    with pytest.raises(SlmError, match="LSH attention hashes"):
        tiny("lsh").new_cache(1, kv="bf16")
    lin = tiny("linear")  # no keys/values kept: only the state, which stays fp32
    assert lin.new_cache(1, kv="int8").nbytes() == lin.new_cache(1).nbytes() == sum(
        t.numel() * 4 for s in lin.new_cache(1).state for t in s)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_holds_only_what_the_kind_reads(kind):
    """Keys and values (B · nkv · max_len · hd fp32 per layer, twice) for the kinds that attend over the cache; linear
    attention reads only its recurrent state, Σφ(k)vᵀ (B · nh · m · hd) and Σφ(k) (B · nh · m) per layer, allocated
    up front like the keys/values."""
    m = tiny(kind)
    c = m.config
    cache = m.new_cache(2)
    kv = 2 * c.n_layer * 2 * c.n_kv_head * c.block_size * c.head_dim * 4
    state = c.n_layer * 2 * c.n_head * (c.linear_features * c.head_dim + c.linear_features) * 4
    assert cache.nbytes() == (state if kind == "linear" else kv)
    x = torch.randint(0, 61, (2, 30))
    with torch.inference_mode():
        m(x[:, :20], cache=cache)
        m(x[:, 20:21], cache=cache)
    assert cache.nbytes() == (state if kind == "linear" else kv)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_len", [3, 20])
def test_cached_generation_equals_uncached(kind, prompt_len):
    m = tiny(kind)
    with torch.no_grad():  # std 1: at the init's 0.02 greedy decoding repeats one token whatever the path computes
        for w in m.parameters():
            if w.dim() > 1:
                w.normal_(0, 1.0)
    prompt = [(7 * i + 3) % 61 for i in range(prompt_len)]
    p = SamplingParams(24, temperature=0)
    cached = list(generate(m, prompt, p, use_cache=True))
    assert cached == list(generate(m, prompt, p, use_cache=False))
    assert len(cached) == 24 and len(set(cached)) >= 4


def _module(cls, T=37, **kw):
    cfg = ModelConfig(vocab_size=10, block_size=64, n_head=4, n_kv_head=4 if cls is LSHAttention else 2, n_embd=32,
                      pos="none", **{**SMALL, **kw})
    torch.manual_seed(0)
    return cfg, cls(cfg, None, 0)


@pytest.mark.parametrize("cls", [LocalAttention, BlockSparseAttention])
@pytest.mark.parametrize("T", [5, 8, 37])
def test_efficient_path_equals_dense_mask(cls, T):
    """The chunked kernels compute exactly SDPA under the kind's visibility mask (its definition)."""
    _, att = _module(cls)
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    mask = att.visible(torch.arange(T), torch.arange(T))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(att.attend(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_visibility_patterns():
    _, local = _module(LocalAttention)  # w = 8
    vis = local.visible(torch.arange(20), torch.arange(20))
    assert vis[19].nonzero().flatten().tolist() == list(range(12, 20))
    _, bs = _module(BlockSparseAttention)  # b = 8, g = 2, c = 1
    vis = bs.visible(torch.arange(40), torch.arange(40))
    # position 35 (block 4): globals 0, 1; the last position of blocks 0-2; all of blocks 3-4 up to itself
    assert vis[35].nonzero().flatten().tolist() == [0, 1, 7, 15, 23, *range(24, 36)]
    assert vis.sum(1).max() <= 2 * 8 + 2 + 40 // 8  # O(b + g + T/b) keys per query


def test_lsh_sorted_path_equals_dense_definition():
    _, att = _module(LSHAttention, attn_window=4, lsh_buckets=4, lsh_hashes=3)
    q = torch.randn(2, 4, 37, 8)
    k, v = F.normalize(q, dim=-1), torch.randn(2, 4, 37, 8)
    torch.testing.assert_close(att._sorted(q, k, v), att._dense(q, k, v, 0), atol=1e-5, rtol=1e-5)


def test_lsh_attends_within_buckets():
    """With one bucket and a window of the whole context LSH is causal attention over the normalised keys, except that
    a query sees itself only when nothing else is visible."""
    _, att = _module(LSHAttention, attn_window=16, lsh_buckets=2, lsh_hashes=1)
    att.rotations.zero_()  # every key lands in bucket 0 (argmax of all-equal scores)
    q = torch.randn(1, 4, 16, 8)
    k, v = F.normalize(q, dim=-1), torch.randn(1, 4, 16, 8)
    s = q @ k.transpose(-1, -2)
    s = s.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(-1), float("-inf"))
    s[..., 0, 0] = 0.0  # the first query has only itself
    ref = torch.softmax(s, -1) @ v
    torch.testing.assert_close(att._sorted(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_favor_approximates_softmax_attention():
    """FAVOR+ is an unbiased estimator of the softmax kernel: with many features, causal linear attention is close to
    exact causal softmax attention; the chunked prefix sums equal the quadratic form of the same features."""
    _, att = _module(LinearAttention, linear_features=4096)
    torch.manual_seed(1)
    q, k, v = 0.5 * torch.randn(1, 4, 40, 8), 0.5 * torch.randn(1, 4, 40, 8), torch.randn(1, 4, 40, 8)
    qf, kf = att._phi(q, True), att._phi(k, False)
    y, _ = att._causal(qf, kf, v, None)
    a = (qf @ kf.transpose(-1, -2)).tril()
    torch.testing.assert_close(y, (a @ v) / a.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)  # prefix sums exact
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (y - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_linear_features_are_deterministic_and_redraw_when_asked(tmp_path):
    a, b = tiny("linear"), tiny("linear")
    torch.testing.assert_close(a.blocks[0].attn.features, b.blocks[0].attn.features)
    assert not torch.equal(a.blocks[0].attn.features, a.blocks[1].attn.features)  # one draw per layer
    m = tiny("linear", linear_redraw=2).train()
    att = m.blocks[0].attn
    before, seed = att.features.clone(), int(att.feature_seed)
    x = torch.randint(0, 61, (1, 16))
    m(x)
    assert torch.equal(att.features, before)
    m(x)
    assert int(att.feature_seed) == seed + 1 and not torch.equal(att.features, before)
    m.eval()
    out1, _ = m(x)
    out2, _ = m(x)
    assert torch.equal(out1, out2)  # no redraw in eval
    assert {"blocks.0.attn.features", "blocks.0.attn.feature_seed"} <= set(m.state_dict())  # saved with the weights


@pytest.mark.parametrize(("overrides", "needle"), [
    (dict(attention="sparse"), "allowed: full, local, blocksparse, linear, lsh"),
    (dict(attention="local", attn_window=65), "attn_window=65 must be <= block_size=64"),
    (dict(attention="lsh", attn_window=65), "attn_window=65 must be <= block_size=64"),
    (dict(attention="blocksparse", attn_block=80), "attn_block=80 must be <= block_size=64"),
    (dict(attention="blocksparse", attn_summary=9, attn_block=8), "attn_summary=9 must be <= attn_block=8"),
    (dict(attention="lsh", lsh_buckets=3), "lsh_buckets=3 must be an even number"),
    (dict(attention="lsh", n_kv_head=2), "n_kv_head=2 must equal n_head=4"),
    (dict(attention="linear", linear_features=0), "linear_features=0 must be a positive integer"),
])
def test_invalid_attention_config(overrides, needle):
    with pytest.raises(SlmError, match=needle):
        ModelConfig(block_size=64, n_head=4, n_embd=32, **overrides)


def test_window_fields_are_ignored_by_full_attention():
    """The default window (64) exceeds this context, but full attention neither validates nor uses it."""
    cfg = ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=32, attn_window=64)
    torch.manual_seed(0)
    a = GPT(cfg).eval()
    torch.manual_seed(0)
    b = GPT(cfg.replace(attn_window=2)).eval()  # a window that would change every position past the second
    x = torch.randint(0, 61, (1, 16))
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_loss_decreases(kind, short_training):
    first, last = short_training(attention=kind, **SMALL)
    assert last < first - 0.7, (first, last)


@pytest.mark.parametrize("nkv", [4, 2])
@pytest.mark.parametrize("T", [1, 17, 64, 300, EXPLICIT_MAX_T[torch.bfloat16] + 8])
def test_causal_attention_paths_agree(T, nkv):
    """bf16 causal attention (the explicit path up to EXPLICIT_MAX_T tokens, SDPA above) matches fp32 SDPA in value and
    in the gradients of q, k and v, with grouped-query attention too."""
    torch.manual_seed(0)
    q32 = torch.randn(2, 4, T, 16, requires_grad=True)
    k32, v32 = (torch.randn(2, nkv, T, 16, requires_grad=True) for _ in range(2))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=nkv != 4)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
    out = causal_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    grads = torch.autograd.grad(out, (q, k, v), g.bfloat16())
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(causal_attention(q32, k32, v32), ref, atol=0, rtol=0)  # fp32 is SDPA itself


def test_causal_attention_dropout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4).bfloat16() for _ in range(3))
    assert causal_attention(q, k, v, 0.0).equal(causal_attention(q, k, v, 0.0))
    assert not causal_attention(q, k, v, 0.5).equal(causal_attention(q, k, v, 0.0))


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_is_rewindable_exactly_when_moving_pos_back_recomputes_the_same(kind):
    """Decode 12 tokens, rewind to position 8 and feed 4 others: a rewindable cache then equals a fresh prefill of
    that sequence; linear attention's state (the one cache that says it is not) still sums the 4 dropped tokens."""
    m = tiny(kind)
    x, y = torch.randint(0, 61, (1, 12)), torch.randint(0, 61, (1, 4))
    cache = m.new_cache(1)
    m(x, cache=cache)
    cache.pos = 8
    rewound = m(y, cache=cache)[0]
    fresh = m(torch.cat([x[:, :8], y], dim=1))[0][:, 8:]
    assert cache.rewindable == (kind != "linear")
    assert torch.allclose(rewound, fresh, atol=1e-5, rtol=1e-4) == cache.rewindable
