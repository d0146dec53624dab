"""The fused decode step (kernels.c) on the attention kinds beyond full and sliding-window attention — block-sparse,
linear (Performer FAVOR+: a recurrent state in the cache instead of keys/values), LSH (Reformer) — and on low-rank
projections: each against the PyTorch forward over several decode steps, through FusedDecoder on each instruction
path, and through BatchDecoder, whose rows must equal FusedDecoder's exactly (test_batch_decode.py's plan: slots at
different positions joining, leaving and reusing a slot) and may include prompt chunks of several positions. Also
models whose heads were pruned (attention narrower than n_embd)."""

from __future__ import annotations

import pytest
import torch
from test_batch_decode import MAX_LEN, _check  # tests/infer is on sys.path
from test_kernels import _fused_logits, _model, variant  # noqa: F401  (variant: a fixture; kernels.c builds)

from slmkit import kernels
from slmkit.compress import quantize
from slmkit.config import ModelConfig
from slmkit.finetune.lora import add_lora
from slmkit.infer.fused import BatchDecoder, FusedDecoder
from slmkit.infer.quantized import QuantLinear
from slmkit.model import GPT

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")

# small enough that each kind's pattern shows within 24 positions: blocks of 3-4 with global and summary positions,
# an LSH window of 3-4 same-bucket keys, 16-24 random features, ranks well below the widths (n_embd 128)
KINDS = {
    "lowrank-gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, lowrank=16),
    "lowrank-llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, lowrank=24),
    "blocksparse": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, attention="blocksparse",
                        attn_block=4, attn_global=2, attn_summary=1),
    "blocksparse-gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, attention="blocksparse",
                             attn_block=3, attn_global=1, attn_summary=2),
    "linear": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, attention="linear", linear_features=16),
    "linear-gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, attention="linear",
                        linear_features=24),
    "lsh": dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention="lsh", attn_window=3, lsh_buckets=4,
                lsh_hashes=2),
    "lsh-nopos": dict(pos="none", norm="layernorm", mlp="gelu", attention="lsh", attn_window=4, lsh_buckets=6,
                      lsh_hashes=3),
    "lowrank-linear": dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention="linear", linear_features=16,
                           lowrank=16),
    "lowrank-lsh": dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention="lsh", attn_window=3, lsh_buckets=4,
                        lsh_hashes=2, lowrank=16),
    # heads pruned: the attention (n_head · head_size) narrower than n_embd, so its rows have their own stride
    "pruned-heads": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_head=3, n_kv_head=3, head_size=32),
    "pruned-heads-gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_head=2, head_size=32),
    "pruned-heads-linear": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_head=2, n_kv_head=1, head_size=32,
                                attention="linear", linear_features=16),
}


@pytest.mark.parametrize("name", KINDS)
def test_fused_step_matches_pytorch(variant, name):  # noqa: F811  (the imported fixture)
    """18 decode steps after a 6-token PyTorch prefill, against the forward over the whole sequence (each kind's
    efficient path: chunked linear attention, sorted LSH buckets, gathered block-sparse keys)."""
    model = _model(**KINDS[name])
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids)[0][0, 6:]
    torch.testing.assert_close(_fused_logits(model, ids, 6), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, kv", [(name, "fp32") for name in KINDS] +
                         [("blocksparse", "bf16"), ("blocksparse-gpt2", "int8"), ("lowrank-llama", "int8")])
def test_batched_rows_equal_fused_and_pytorch(name, kv):
    """A narrow cache rounds keys/values by the rule the PyTorch forward applies (test_batch_decode.py explains
    the bound). Linear attention's recurrent state lives in the batch cache, one row per slot (KVCache.slot)."""
    _check(_model(**KINDS[name]), kv, None if kv == "fp32" else 3e-3)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_low_rank_factors_with_quantized_weights(dtype):
    """Each factor of a low-rank layer is a QuantLinear after quantize, read packed like any other; the PyTorch
    forward widens larger batches with exact activations, so the comparison is loose (as test_batch_decode.py's)."""
    model = quantize(_model(pos="rope", norm="rmsnorm", mlp="swiglu", attention="blocksparse", attn_block=4,
                            lowrank=32), dtype)
    assert isinstance(model.blocks[0].attn.qkv.a, QuantLinear) and isinstance(model.blocks[0].mlp.proj.b, QuantLinear)
    _check(model, "fp32", 0.03)


@pytest.mark.parametrize("name", ["blocksparse", "linear", "lsh"])
def test_two_threads_give_each_row_the_same_logits(name):
    """Threads split the (row, head) pairs; linear attention's pairs take a whole sequence's rows in order."""
    _check(_model(**KINDS[name]), "fp32", None, threads=2)


@pytest.mark.parametrize("name", ["linear", "blocksparse", "lsh", "lowrank-llama"])
def test_prompt_chunks_and_decoding_rows_share_a_step(name):
    """Slots 0 and 2 prefill their prompts in chunks of several positions while slot 1 decodes: each chunk row's
    logits are the full forward's at its position (for linear attention: each row reads the state of the rows
    before it in the same step). Slot 0 held another sequence before: position 0 starts afresh (for linear attention,
    its stale state is dropped)."""
    model = _model(**KINDS[name])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (7, 2, 5)]
    cache = model.new_cache(3, MAX_LEN)
    dec = BatchDecoder.for_model(model, cache, rows=3 + 8)
    assert dec is not None
    views = [cache.slot(b) for b in range(3)]
    with torch.inference_mode():
        model(torch.randint(0, 97, (1, 9), generator=g), cache=views[0])  # an earlier request in slot 0
        views[0].pos = 0
        model(prompts[1][None], cache=views[1])
        full = [torch.cat([p, torch.tensor([5, 6, 9])]) for p in prompts]
        ref = [model(f[None])[0][0] for f in full]
        extra = iter([5, 6])
        for step in (((0, 0, 4), (2, 0, 5)), ((0, 4, 3),)):  # (slot, from, n) chunks of two steps
            tokens, slots, positions, spans = [next(extra)], [1], [views[1].pos], []
            for b, start, n in step:
                spans.append((b, start, len(tokens), n))
                tokens += prompts[b][start : start + n].tolist()
                slots += [b] * n
                positions += range(start, start + n)
            logits = dec(tokens, slots, positions).clone()
            torch.testing.assert_close(logits[0], ref[1][views[1].pos], rtol=1e-4, atol=1e-4)
            views[1].pos += 1
            for b, start, row, n in spans:
                torch.testing.assert_close(logits[row : row + n], ref[b][start : start + n], rtol=1e-4, atol=1e-4)
                views[b].pos += n
        # every slot decodes on from what the chunks left
        after = dec([5, 9, 5], [0, 1, 2], [v.pos for v in views]).clone()
    want = torch.stack([ref[0][len(prompts[0])], ref[1][len(prompts[1]) + 2], ref[2][len(prompts[2])]])
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["linear", "lsh", "blocksparse", "lowrank-gpt2"])
def test_fused_and_pytorch_steps_continue_each_others_cache(name):
    """FusedDecoder and the PyTorch forward read and write the same cache (keys/values, or linear attention's state,
    updated in place by both), so decoding may switch between them at any step."""
    model = _model(**KINDS[name])
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(1, MAX_LEN)
    dec = FusedDecoder.for_model(model, cache)
    assert dec is not None
    got = []
    with torch.inference_mode():
        model(ids[:, :4], cache=cache)
        for t in range(4, 16):
            if t % 3 == 2:  # every third step through PyTorch
                got.append(model(ids[:, t : t + 1], cache=cache)[0][0, -1])
            else:
                got.append(dec(int(ids[0, t]), t).clone())
                cache.pos += 1
        want = model(ids)[0][0, 4:]
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-4, atol=1e-4)


def test_the_presets_decode_through_the_c_step():
    """The sub-quadratic and low-rank presets the speed comparison runs (config.py)."""
    for preset in ("blocksparse-3m", "linear-3m", "lsh-3m", "lowrank-3m"):
        model = GPT(ModelConfig.preset(preset, vocab_size=97)).eval()
        for cache in (model.new_cache(1, 16), model.new_cache(3, 16).slot(1)):
            assert FusedDecoder.for_model(model, cache) is not None, preset
        assert BatchDecoder.for_model(model, model.new_cache(3, 16)) is not None, preset


def test_an_unmerged_lora_adapter_falls_back():
    """LoRALinear is not a layer the C step reads: decoding stays in PyTorch (merge_lora first for the C step)."""
    model = add_lora(_model(**KINDS["linear"]), rank=4)
    assert FusedDecoder.for_model(model, model.new_cache(1, 16)) is None
