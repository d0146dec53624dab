"""BatchDecoder (kernels.c `slm_decode_batch`): continuous batching in one batch-S KV cache. Requests of different
prompt lengths are prefilled through `cache.slot(b)` with the PyTorch forward, join and leave between steps, reuse a
freed slot, and are fed to each step in a shuffled order; every row of every step must give exactly the logits
FusedDecoder gives for that sequence alone (the same arithmetic: a row's result must not depend on its neighbours),
and the PyTorch forward's logits up to the rounding the weights and KV cache storage bring."""

from __future__ import annotations

import pytest
import torch
from test_kernels import CONFIGS, _model, variant  # noqa: F401  (variant: a fixture; tests/infer is on sys.path)

from slmkit import kernels
from slmkit.compress import quantize
from slmkit.finetune.lora import add_lora
from slmkit.infer.fused import BatchDecoder, FusedDecoder
from slmkit.model import GPT

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")

SLOTS, MAX_LEN = 6, 24
# The requests of one run: (cache slot, prompt length, decode steps, step at which it joins). Slot 2 stays idle; slot 3
# is freed after step 6 and taken by another request, over the stale keys/values of the first. The steps hold 1 to 5
# sequences: every grouping of rows the kernels make (kernels.c row(): 4 at a time, the last 2 or 3 together, a single
# last row on its own).
PLAN = [(3, 5, 7, 0), (0, 1, 10, 0), (1, 9, 4, 2), (3, 3, 2, 7), (5, 2, 6, 1), (4, 4, 5, 2)]
STEPS = max(start + n for _, _, n, start in PLAN)


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (p + n,), generator=g) for _, p, n, _ in PLAN]


def _batched(model: GPT, seqs: list[torch.Tensor], kv: str, threads: int = 1) -> list[torch.Tensor]:
    """Run PLAN through one BatchDecoder; each request's logits (decode steps, V). The steps take `threads`, the
    prefills one, like the references' (PyTorch's GEMM rounds differently with another thread count)."""
    cache = model.new_cache(SLOTS, MAX_LEN, kv=kv)
    dec = BatchDecoder.for_model(model, cache)
    assert dec is not None
    views, out = {}, [[] for _ in PLAN]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for step in range(STEPS):
            for r, (slot, p, _, start) in enumerate(PLAN):
                if step == start:  # prefill while the others are mid-decode
                    views[r] = cache.slot(slot)
                    model(seqs[r][None, :p], cache=views[r])
            active = [r for r, (_, _, n, start) in enumerate(PLAN) if start <= step < start + n]
            order = [active[i] for i in torch.randperm(len(active), generator=g)]
            torch.set_num_threads(threads)
            logits = dec([int(seqs[r][views[r].pos]) for r in order], [PLAN[r][0] for r in order],
                         [views[r].pos for r in order])
            torch.set_num_threads(1)
            assert logits.shape == (len(order), model.config.vocab_size)
            for row, r in enumerate(order):
                out[r].append(logits[row].clone())
                views[r].pos += 1
    return [torch.stack(o) for o in out]


def _fused(model: GPT, seq: torch.Tensor, p: int, kv: str) -> torch.Tensor:
    """FusedDecoder alone on a batch-1 cache: prefill seq[:p], then one token per step."""
    cache = model.new_cache(1, MAX_LEN, kv=kv)
    torch.set_num_threads(1)
    with torch.inference_mode():
        model(seq[None, :p], cache=cache)
        dec = FusedDecoder.for_model(model, cache)
        assert dec is not None
        return torch.stack([dec(int(seq[t]), t).clone() for t in range(p, len(seq))])


def _pytorch(model: GPT, seq: torch.Tensor, p: int, kv: str) -> torch.Tensor:
    """The PyTorch forward: over the whole sequence (fp32 cache), or prefill + one token per forward storing keys and
    values as `kv` (a rounded cache changes what later positions attend to, by the rule the C step also applies)."""
    with torch.inference_mode():
        if kv == "fp32":
            return model(seq[None])[0][0, p:]
        cache = model.new_cache(1, MAX_LEN, kv=kv)
        model(seq[None, :p], cache=cache)
        return torch.stack([model(seq[None, t : t + 1], cache=cache)[0][0, -1] for t in range(p, len(seq))])


def _check(model: GPT, kv: str, tol: float | None, threads: int = 1) -> None:
    """Batched == FusedDecoder exactly; against PyTorch elementwise (tol None) or within a relative norm `tol`."""
    seqs = _sequences()
    batched = _batched(model, seqs, kv, threads)
    for r, (_, p, _, _) in enumerate(PLAN):
        assert torch.equal(batched[r], _fused(model, seqs[r], p, kv)), f"request {r}"
        want = _pytorch(model, seqs[r], p, kv)
        if tol is None:
            torch.testing.assert_close(batched[r], want, rtol=1e-4, atol=1e-4)
        else:
            assert (batched[r] - want).norm() / want.norm() < tol, f"request {r}"


@pytest.mark.parametrize("kv", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "local-window", "moe-top2", "moe-top1-gelu-bias"])
def test_batched_rows_equal_fused_and_pytorch(name, kv):
    """fp32 weights. A narrow cache: the PyTorch and C steps round the same values by the same rule, except at a tie
    that an fp32 last-bit difference tips the other way: one stored value then moves by a bf16 ulp (2^-8) or an int8
    step, a small change of the logits from then on (a misplaced cache row changes them by about their own size)."""
    _check(_model(**CONFIGS[name]), kv, None if kv == "fp32" else 3e-3)


@pytest.mark.parametrize("dtype, name, kv", [("int8", "llama", "fp32"), ("int8", "gpt2", "fp32"),
                                             ("int8", "moe-top2", "fp32"), ("int4", "llama", "fp32"),
                                             ("int4", "gpt2", "fp32"), ("int4", "moe-top1-gelu-bias", "fp32"),
                                             ("int8", "local-window", "int8"), ("int4", "llama", "bf16")])
def test_batched_rows_with_quantized_weights(dtype, name, kv):
    """int8/int4 weights quantize the activations in the C kernels; the PyTorch forward uses the same kernels for
    small batches but widens the weights with exact activations for larger ones, so it is compared loosely."""
    _check(quantize(_model(**CONFIGS[name]), dtype), kv, 0.03)


@pytest.mark.parametrize("name, dtype", [("llama", "fp32"), ("moe-top2", "int8")])
def test_two_threads_give_each_row_the_same_logits(name, dtype):
    """The parallel loops (rows' norms and cache writes, (row, head) attention pairs, expert groups) split the rows
    between threads; no row may see another's scratch. (One thread elsewhere: 2-thread barriers are slow on a busy
    machine.)"""
    _check(quantize(_model(**CONFIGS[name]), dtype), "int8", 3e-3 if dtype == "fp32" else 0.03, threads=2)


@pytest.mark.parametrize("dtype, name", [("int8", "moe-top2"), ("int4", "llama"), ("bf16", "gpt2")])
def test_batched_rows_equal_fused_on_each_instruction_path(variant, dtype, name):  # noqa: F811
    """Each build converts the activations of every row in its own way (int8/int4 blocks, bf16, widened weights)."""
    model = quantize(_model(**CONFIGS[name]), dtype)
    seqs = _sequences(2)
    batched = _batched(model, seqs, "fp32")
    for r, (_, p, _, _) in enumerate(PLAN):
        assert torch.equal(batched[r], _fused(model, seqs[r], p, "fp32")), f"request {r}"


def test_logits_buffer_is_reused_and_an_empty_step_is_allowed():
    model = _model(**CONFIGS["llama"])
    dec = BatchDecoder.for_model(model, model.new_cache(2, 8))
    with torch.inference_mode():
        first = dec([1, 2], [0, 1], [0, 0])
        dec([3], [1], [1])
    assert first.data_ptr() == dec.logits.data_ptr()
    assert dec([], [], []).shape == (0, model.config.vocab_size)


@pytest.mark.parametrize("tokens, slots, positions, match", [
    ([1, 2, 3], [0, 1, 1], [0, 0, 1], "3 rows in one step, but this step was built for at most 2"),
    ([1, 2], [1, 1], [3, 3], r"slots \[1, 1\] at positions \[3, 3\] repeat a \(slot, position\) pair"),
    ([1], [2], [0], r"slot 2 is outside 0\.\.1"),
    ([1], [-1], [0], r"slot -1 is outside 0\.\.1"),
    ([1, 2], [0, 1], [7, 8], r"position 8 is outside 0\.\.7"),
    ([1], [0], [-1], r"position -1 is outside 0\.\.7"),
    ([97], [0], [0], r"token 97 is outside 0\.\.96"),
    ([1, 2], [0], [0, 0], "got 2 tokens, 1 slots and 2 positions"),
])
def test_bad_steps_are_refused(tokens, slots, positions, match):
    model = _model(**CONFIGS["llama"])
    dec = BatchDecoder.for_model(model, model.new_cache(2, 8))
    with pytest.raises(ValueError, match=match):
        dec(tokens, slots, positions)


@pytest.mark.parametrize("name, dtype, kv", [("llama", "fp32", "fp32"), ("gpt2", "fp32", "int8"),
                                             ("moe-top2", "fp32", "bf16"), ("llama", "int8", "fp32")])
def test_prompt_chunks_prefill_in_the_same_step_as_decoding_rows(name, dtype, kv):
    """A slot may take several consecutive positions in one call (a prompt chunk beside the other slots' decode
    rows): each chunk row's logits are the PyTorch forward's at that position, and what the chunks leave in the
    cache decodes on exactly as a cache prefilled by PyTorch does (within the KV storage's rounding)."""
    model = _model(**CONFIGS[name])
    if dtype != "fp32":
        model = quantize(model, dtype)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (7, 1, 5)]
    cache = model.new_cache(3, MAX_LEN, kv=kv)
    dec = BatchDecoder.for_model(model, cache, rows=3 + 8)
    assert dec is not None and dec.rows == 11
    views = [cache.slot(b) for b in range(3)]
    exact = kv == "fp32" and dtype == "fp32"
    torch.set_num_threads(1)
    with torch.inference_mode():
        model(prompts[1][None], cache=views[1])  # slot 1 decodes while 0 and 2 prefill in chunks of 4 and 5
        ref = [model(torch.cat([p, torch.tensor([5, 6])])[None])[0][0] for p in prompts]  # fp32-cache references
        plan = [((0, 0, 4), (2, 0, 5)), ((0, 4, 3),)]  # (slot, from, n) chunks of two steps
        extra = iter([5, 6])
        for step in plan:
            tokens, slots, positions, spans = [next(extra)], [1], [views[1].pos], []
            for b, start, n in step:
                spans.append((b, start, len(tokens), n))
                tokens += prompts[b][start : start + n].tolist()
                slots += [b] * n
                positions += range(start, start + n)
            logits = dec(tokens, slots, positions).clone()
            views[1].pos += 1
            for b, start, row, n in spans:
                got, want = logits[row : row + n], ref[b][start : start + n]
                if exact:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                else:  # rounded keys/values or activations: the relative norm, as _check does
                    assert (got - want).norm() / want.norm() < 0.03
                views[b].pos += n
        # every slot now decodes on from what the step left (slot 1 took two tokens beside the chunks)
        after = dec([5, 9, 5], [0, 1, 2], [v.pos for v in views]).clone()
        one = model(torch.cat([prompts[1], torch.tensor([5, 6, 9])])[None])[0][0, -1]
    want = torch.stack([ref[0][len(prompts[0])], one, ref[2][len(prompts[2])]])
    assert (after - want).norm() / want.norm() < (1e-5 if exact else 0.03)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_logits_rows_are_those_rows_of_the_full_step(dtype):
    """Asking for some rows' logits (a prompt chunk's last, the decoding rows) gives exactly those rows of the full
    step, in the order asked, and the cache the same keys/values; with none, the step only fills the cache."""
    model = _model(**CONFIGS["llama"])
    if dtype != "fp32":
        model = quantize(model, dtype)
    caches = [model.new_cache(3, MAX_LEN) for _ in range(2)]
    full, some = (BatchDecoder.for_model(model, c, rows=12) for c in caches)
    g = torch.Generator().manual_seed(5)
    steps = [([0] * 9 + [1, 2], [*range(9), 0, 0]), ([0, 1, 2], [9, 1, 1])]  # (slots, positions)
    asked = [[10, 8, 9], [2, 0]]
    torch.set_num_threads(1)
    with torch.inference_mode():
        for (slots, positions), rows in zip(steps, asked, strict=True):
            tokens = torch.randint(0, 97, (len(slots),), generator=g).tolist()
            want = full(tokens, slots, positions)[rows].clone()
            assert torch.equal(some(tokens, slots, positions, logits_rows=rows), want)
        assert some([3], [2], [2], logits_rows=[]).shape == (0, model.config.vocab_size)
        full([3], [2], [2])
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"logits_rows \[0, 2\]: at most 2 of the rows 0\.\.1"):
        some([1, 2], [0, 1], [5, 5], logits_rows=[0, 2])


def test_positions_stop_at_the_context_when_the_cache_is_longer():
    """Position tables (RoPE here) have block_size rows: a longer cache does not let a step read past them."""
    model = _model(**CONFIGS["llama"], block_size=16)
    dec = BatchDecoder.for_model(model, model.new_cache(2, 32))
    with pytest.raises(ValueError, match=r"position 16 is outside 0\.\.15"):
        dec([1], [0], [16])


def test_for_model_refuses_what_fused_refuses_except_the_batch():
    model = add_lora(_model(pos="rope"), rank=4)  # LoRALinear: no layer the C step reads
    assert BatchDecoder.for_model(model, model.new_cache(3, 16)) is None
    model = _model(**CONFIGS["llama"])
    for batch in (1, 3):
        assert BatchDecoder.for_model(model, model.new_cache(batch, 16)) is not None
    assert FusedDecoder.for_model(model, model.new_cache(3, 16)) is None
    assert FusedDecoder.for_model(model, model.new_cache(3, 16).slot(1)) is not None
    assert BatchDecoder.for_model(model.bfloat16(), model.new_cache(2, 16)) is None
