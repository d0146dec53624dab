"""sample_rows / sample_next: the distribution drawn, filters, and rows independent of their neighbours."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.sampling import SamplingParams, sample_next, sample_rows


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_frequencies_match_the_softmax():
    """20,000 draws from a known 5-token distribution at temperature 0.5 land within 4 standard errors of it."""
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, -9.0])
    want = torch.softmax(logits / 0.5, -1)
    g, n = gen(0), 20_000
    counts = torch.zeros(5)
    p = SamplingParams(temperature=0.5)
    for _ in range(n // 8):  # eight rows a call: the batched path
        for k in sample_rows(logits.repeat(8, 1), [p] * 8, [g] * 8):
            counts[k] += 1
    for k in range(5):
        se = math.sqrt(want[k] * (1 - want[k]) / n)
        assert abs(counts[k] / n - want[k]) <= 4 * se + 1e-4, (k, counts[k] / n, want[k])
    assert counts[4] == 0  # p ≈ 1e-10: never drawn in 20,000


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_a_row_samples_the_same_alone_or_in_a_batch(n, which, seed):
    """Row b's token depends on its logits, parameters and generator only — the server batches requests, and a
    seeded request must give the same text however many others run beside it."""
    which = which % n
    torch.manual_seed(seed)
    logits = torch.randn(n, 300) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=q) for t, k, q in
              [(0.7, None, None), (1.0, 20, None), (0.0, None, None), (1.3, None, 0.8), (0.5, 5, 0.9), (1.0, 1, None)]]
    params = params[:n]
    batch = sample_rows(logits.clone(), params, [gen(seed + b) for b in range(n)])
    alone = sample_next(logits[which].clone(), torch.empty(0), params[which], gen(seed + which))
    assert batch[which] == alone


def test_filters_and_greedy_rows_mixed_in_one_batch():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0]).repeat(4, 1)
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    hist = [torch.empty(0, dtype=torch.long)] * 3 + [torch.tensor([0])]
    picks = [sample_rows(logits.clone(), params, [gen(s)] * 4, hist) for s in range(200)]
    assert {p[0] for p in picks} == {0, 1}  # top_k=2 keeps two tokens, and both come up
    assert {p[1] for p in picks} == {0}  # probs ≈ [0.72, 0.26, ...]: top_p=0.5 keeps the first token only
    assert {p[2] for p in picks} == {0}  # greedy
    assert {p[3] for p in picks} == {1}  # the penalty demotes token 0 below the runner-up


def test_never_picks_a_masked_token_at_the_top_of_the_cdf():
    """A uniform draw just under 1 must not land on trailing tokens that top_k removed."""
    logits = torch.tensor([0.0, 0.0, -50.0, -50.0])
    g = gen(1)
    for _ in range(2000):
        assert sample_next(logits.clone(), torch.empty(0), SamplingParams(temperature=1.0, top_k=2), g) in (0, 1)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 rows, 1 sampling parameters"):
        sample_rows(torch.zeros(2, 4), [SamplingParams()], [None])
