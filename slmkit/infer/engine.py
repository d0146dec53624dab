"""The inference engine: token ids in, token ids out. Tokenizers, chat templates and HTTP live around it.

Decoding uses a static KV cache: the prompt is prefilled once, then each new token costs one forward pass over a single
position. `use_cache=False` recomputes the whole context every step; both paths produce the same tokens (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from slmkit.errors import SlmError
from slmkit.infer.fused import FusedDecoder
from slmkit.model import GPT
from slmkit.sampling import SamplingParams, sample_next


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
