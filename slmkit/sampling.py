"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Below every model: the transformer's engine (slmkit.infer.engine) and the n-gram model sample by the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slmkit.errors import SlmError


@dataclass
class SamplingParams:
    """How to pick the next token. temperature=0 is greedy; top_k/top_p=None disable those filters."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context (CTRL / HF convention)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SlmError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise SlmError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise SlmError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SlmError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise SlmError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")


def sample_rows(logits: Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator | None],
                histories: Sequence[Tensor] | None = None) -> list[int]:
    """Pick one token per row of (B, V) fp32 logits (modified in place), row b by `params[b]` with generator
    `gens[b]`; `histories[b]`: the ids already in row b's context (for the repetition penalty).

    The whole batch shares one softmax and one cumulative sum, and each row draws one uniform number from its own
    generator (inverse-CDF sampling), so a row's token depends only on its logits, its parameters and its generator —
    never on the rows beside it: a seeded request samples the same text alone or in a batch.
    """
    n = logits.shape[0]
    if not n == len(params) == len(gens):
        raise ValueError(f"{n} rows, {len(params)} sampling parameters and {len(gens)} generators")
    out: list[int | None] = [None] * n
    temps = torch.ones(n, 1)
    for b, p in enumerate(params):
        row = logits[b]
        if p.repetition_penalty != 1.0 and histories is not None and histories[b].numel():
            prev = row[histories[b]]
            row[histories[b]] = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
        if p.temperature == 0:
            out[b] = int(row.argmax())
            continue
        temps[b] = p.temperature
        if p.top_k is not None and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row.masked_fill_(row < kth, float("-inf"))
    todo = [b for b in range(n) if out[b] is None]
    if not todo:
        return out  # type: ignore[return-value]
    rows = torch.tensor(todo)
    probs = torch.softmax(logits[rows] / temps[rows], dim=-1)
    for i, b in enumerate(todo):
        p = params[b]
        if p.top_p is not None and p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs[i], descending=True)
            # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays in)
            sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= p.top_p] = 0.0
            probs[i] = torch.zeros_like(probs[i]).scatter_(0, order, sorted_probs)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=gens[b]) for b in todo])
    picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    for i, b in enumerate(todo):
        k = int(picks[i])
        if k >= cdf.shape[1] or probs[i, k] == 0:  # rounding at the top of the cdf: the last token with mass
            k = int(probs[i].nonzero()[-1])
        out[b] = k
    return out  # type: ignore[return-value]


def sample_next(logits: Tensor, history: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Pick one token from (V,) fp32 logits (modified in place). `history`: ids already in the context (for the
    repetition penalty). The one-row case of `sample_rows`."""
    return sample_rows(logits.unsqueeze(0), [p], [gen], [history])[0]
