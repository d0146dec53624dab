import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer import SamplingParams, generate, sample_next
from slmkit.model import GPT


def model(pos: str = "rope", **kw) -> GPT:
    """A tiny model with weights of std 1: at its init (std 0.02) greedy decoding repeats one token, and a comparison
    of two decoding paths would hold whatever they computed."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(**{"vocab_size": 50, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "pos": pos,
                           **kw})).eval()
    with torch.no_grad():
        for w in m.parameters():
            if w.dim() > 1:
                w.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("params", [SamplingParams(40, temperature=0),
                                    SamplingParams(40, temperature=1.0, top_k=10, top_p=0.9, seed=3),
                                    SamplingParams(40, temperature=0.7, repetition_penalty=1.3, seed=5)])
def test_cached_decoding_equals_uncached(pos, params):
    m = model(pos)
    prompt = [1, 2, 3, 4, 5]
    cached = list(generate(m, prompt, params, use_cache=True))
    uncached = list(generate(m, prompt, params, use_cache=False))
    assert len(cached) == 40 and len(set(cached)) >= 5
    assert cached == uncached


def windowed_greedy(m: GPT, prompt: list[int], n_new: int, keep: int | None) -> list[int]:
    """Greedy decoding by the rule `generate` documents, each token from a fresh forward pass over its context:
    keep=None (uncached) the newest block_size tokens; else the `keep` tokens kept at the last shift + those since."""
    block, ids, out = m.config.block_size, list(prompt), []
    start = max(0, len(ids) - block)
    for _ in range(n_new):
        if keep is None:
            start = max(0, len(ids) - block)
        elif len(ids) - start > block:
            start = len(ids) - keep
        with torch.inference_mode():
            out.append(int(m(torch.tensor([ids[start:]]))[0][0, -1].argmax()))
        ids.append(out[-1])
    return out


PAST = [(7 * i + 3) % 50 for i in range(60)]  # + 40 new tokens in a 64-token window: shifts at new tokens 5, 22, 39


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "pos"), [*((k, "rope") for k in ("full", "local", "blocksparse", "linear", "lsh")),
                                           ("full", "learned"), ("local", "learned")])  # absolute positions restart
def test_past_the_context_each_path_computes_its_documented_function(kind, pos):
    """Cached decoding re-prefills the kept tokens at each shift (keep=0.75 → 48 of 64); uncached decoding slides by one
    token; keep=1.0 makes the cached path the uncached function. fast=True (the C step where it applies) and PyTorch
    agree."""
    m = model(pos, attention=kind, attn_window=8, attn_block=8, attn_global=2, attn_summary=1, linear_features=16,
              lsh_buckets=4)
    p = SamplingParams(40, temperature=0)
    cached = list(generate(m, PAST, p))
    assert len(set(cached)) >= 5
    assert cached == windowed_greedy(m, PAST, 40, keep=48)
    assert list(generate(m, PAST, p, fast=False)) == cached
    uncached = list(generate(m, PAST, p, use_cache=False))
    assert uncached == windowed_greedy(m, PAST, 40, keep=None)
    assert list(generate(m, PAST, p, keep=1.0)) == uncached
    assert list(generate(m, PAST, p, keep=0.5)) == windowed_greedy(m, PAST, 40, keep=32)
    # not the same function: except that a window of 8 with relative (RoPE) positions sees the same tokens either way
    assert (cached == uncached) == (kind == "local" and pos == "rope")


@pytest.mark.parametrize("keep", [0, -0.5, 1.5])
def test_keep_is_validated(keep):
    with pytest.raises(SlmError, match=r"keep=.* must be in \(0, 1\]"):
        list(generate(model(), [1, 2], keep=keep))


def test_stop_ids_and_seed_determinism():
    m = model()
    p = SamplingParams(50, temperature=1.0, seed=11)
    a = list(generate(m, [1, 2], p))
    assert a == list(generate(m, [1, 2], p))
    stop = a[5]
    b = list(generate(m, [1, 2], p, stop_ids=[stop]))
    assert b == a[: a.index(stop) + 1]


def test_top_k_and_top_p_filter():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    hist = torch.tensor([], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits.clone(), hist, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert picks == {0, 1}
    # probs ≈ [0.72, 0.26, 0.005, 0.002]: top_p=0.5 keeps only the first token
    picks = {sample_next(logits.clone(), hist, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(100)}
    assert picks == {0}
    # repetition penalty demotes a token already in the context below the runner-up
    assert sample_next(logits.clone(), torch.tensor([0]), SamplingParams(temperature=0, repetition_penalty=2.0),
                       None) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_new_tokens=-1)])
def test_invalid_sampling_params(bad):
    with pytest.raises(SlmError):
        SamplingParams(**bad)


def test_bad_prompts():
    with pytest.raises(SlmError, match="empty"):
        list(generate(model(), []))
    with pytest.raises(SlmError, match="outside the model's vocabulary"):
        list(generate(model(), [999]))
