"""The inference engine: token ids in, token ids out. Tokenizers, chat templates and HTTP live around it.

Decoding uses a static KV cache: the prompt is prefilled once, then each new token costs one forward pass over a single
position. `use_cache=False` recomputes the whole context every step; both paths produce the same tokens (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slmkit.errors import SlmError
from slmkit.infer.fused import FusedDecoder
from slmkit.model import GPT


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


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Sequence[int],
    params: SamplingParams | None = None,
    *,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    fast: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (streaming). Stops at max_new_tokens or after yielding a stop id.

    When the context fills up, the oldest tokens are dropped: the cache is rebuilt from the newest 3/4 of the context
    (one prefill every block_size/4 tokens instead of one per token). After the prompt, the models fused.py covers
    decode through its C step; `fast=False` keeps every step in PyTorch.
    """
    p = params or SamplingParams()
    if not prompt:
        raise SlmError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
    if max(prompt) >= model.config.vocab_size or min(prompt) < 0:
        raise SlmError(f"prompt holds token ids outside the model's vocabulary of {model.config.vocab_size}")
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    block = model.config.block_size
    ids = torch.tensor(list(prompt), dtype=torch.long)
    model.eval()
    # the cache holds only what this call can need: a full-context cache of an 8k-context model is ~0.4 GB
    cache = model.new_cache(1, min(block, len(ids) + p.max_new_tokens)) if use_cache else None
    # one C call per token after the prompt, for the dense models it covers (fused.py); PyTorch otherwise
    fused = FusedDecoder.for_model(model, cache) if cache is not None and fast else None
    pending = ids[-block:]  # tokens not yet in the cache
    stops = set(stop_ids)
    for _ in range(p.max_new_tokens):
        if cache is not None:
            if cache.pos + len(pending) > cache.max_len:
                cache.reset()
                pending = ids[-(3 * block // 4) :]
            if fused is not None and len(pending) == 1:
                last = fused(int(pending[0]), cache.pos)
                cache.pos += 1
            else:
                last = model(pending[None], cache=cache, last_only=True)[0][0, -1]
        else:
            last = model(ids[-block:][None], last_only=True)[0][0, -1]
        nxt = sample_next(last.float(), ids, p, gen)
        yield nxt
        if nxt in stops:
            return
        ids = torch.cat([ids, torch.tensor([nxt])])
        pending = ids[-1:]
