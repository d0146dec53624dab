import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer import SamplingParams, generate, sample_next
from slmkit.model import GPT


def model(pos: str = "rope") -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32, pos=pos)).eval()


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("params", [SamplingParams(40, temperature=0),
                                    SamplingParams(40, temperature=1.0, top_k=10, top_p=0.9, seed=3),
                                    SamplingParams(40, temperature=0.7, repetition_penalty=1.3, seed=5)])
def test_cached_decoding_equals_uncached(pos, params):
    m = model(pos)
    prompt = [1, 2, 3, 4, 5]
    cached = list(generate(m, prompt, params, use_cache=True))
    uncached = list(generate(m, prompt, params, use_cache=False))
    assert len(cached) == 40
    assert cached == uncached


def test_generation_past_the_context_keeps_going():
    m = model()
    out = list(generate(m, [i % 50 for i in range(1, 60)], SamplingParams(30, temperature=0)))
    assert len(out) == 30 and all(0 <= t < 50 for t in out)


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
