"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Below every model: the transformer's engine (slmkit.infer.engine) and the n-gram model sample by the same rules.
"""

from __future__ import annotations

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


def sample_next(logits: Tensor, history: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """Pick one token from (V,) fp32 logits. `history`: ids already in the context (for the repetition penalty)."""
    if p.repetition_penalty != 1.0 and history.numel():
        prev = logits[history]
        logits[history] = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p is not None and p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays in)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))
