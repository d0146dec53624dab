"""The inference engine: token ids in, token ids out. Tokenizers, chat templates and HTTP live around it.

Decoding uses a static KV cache: the prompt is prefilled once, then each new token costs one forward pass over a single
position. `use_cache=False` recomputes the whole context every step. Inside the context window both paths compute the
same function (tested token for token); past it they differ, as `generate` says.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from slmkit.errors import SlmError
from slmkit.infer.fused import FusedDecoder
from slmkit.model import GPT
from slmkit.sampling import SamplingParams, sample_next

KEEP = 0.75  # default share of the context kept when the cache fills: one re-prefill every block_size/4 tokens


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Sequence[int],
    params: SamplingParams | None = None,
    *,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    fast: bool = True,
    keep: float = KEEP,
    kv: str = "fp32",
) -> Iterator[int]:
    """Yield new token ids one at a time (streaming). Stops at max_new_tokens or after yielding a stop id.

    Past the context window (block_size tokens of prompt + output) the two paths compute different functions:
    - `use_cache=False` slides by one token: every token is predicted from the newest block_size tokens.
    - `use_cache=True` (default) drops the oldest tokens in chunks: when the cache is full it is rebuilt by one
      prefill of the newest `n = max(1, floor(keep · block_size))` tokens, and the next block_size − n tokens extend
      that cache. So each token is predicted from the n tokens kept at the last shift plus those generated since,
      exactly as a fresh forward pass over them would (tested): between n and block_size tokens of context. `keep` in
      (0, 1]: a smaller share re-prefills less often but predicts from less context; `keep=1` re-prefills the newest
      block_size tokens for every token, which is the uncached function at the cost of one full prefill per token.
    Positions restart at 0 after a shift (learned/sinusoidal/RoPE tables index from the window's first token).

    After the prompt, the models fused.py covers decode through its C step; `fast=False` keeps every step in PyTorch.
    `kv` is the KV cache's storage, "fp32", "bf16" or "int8" (slmkit.model.gpt.KVCache): narrower is faster at long
    contexts and changes the logits slightly.
    """
    p = params or SamplingParams()
    if not prompt:
        raise SlmError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
    if max(prompt) >= model.config.vocab_size or min(prompt) < 0:
        raise SlmError(f"prompt holds token ids outside the model's vocabulary of {model.config.vocab_size}")
    if not 0 < keep <= 1:
        raise SlmError(f"keep={keep} must be in (0, 1]: the share of the context kept when it fills up")
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    block = model.config.block_size
    n_keep = max(1, math.floor(keep * block))
    ids = torch.tensor(list(prompt), dtype=torch.long)
    model.eval()
    # the cache holds only what this call can need: a full-context cache of an 8k-context model is ~0.4 GB
    cache = model.new_cache(1, min(block, len(ids) + p.max_new_tokens), kv=kv) if use_cache else None
    # one C call per token after the prompt, for the dense models it covers (fused.py); PyTorch otherwise
    fused = FusedDecoder.for_model(model, cache) if cache is not None and fast else None
    pending = ids[-block:]  # tokens not yet in the cache
    stops = set(stop_ids)
    for _ in range(p.max_new_tokens):
        if cache is not None:
            if cache.pos + len(pending) > cache.max_len:
                cache.reset()
                pending = ids[-n_keep:]
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
