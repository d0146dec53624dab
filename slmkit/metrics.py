"""Loss units shared by every stage: bits per byte, and the trainer's fixed-cost loss over shard windows.

They live below the stages (train, the n-gram model, eval, recipes all use them) so no stage imports another sideways.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from slmkit.runtime import autocast


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Tokenizer-agnostic quality: nats/token → bits/token → bits per UTF-8 byte of the text."""
    return loss_nats_per_token / math.log(2) / bytes_per_token


def window_starts(n_tokens: int, block_size: int, max_windows: int | None) -> np.ndarray:
    """Start offsets of non-overlapping (block_size+1)-token windows; evenly spread when capped by max_windows."""
    n = max(0, (n_tokens - 1) // block_size)
    starts = np.arange(n, dtype=np.int64) * block_size
    if max_windows is not None and n > max_windows:
        starts = starts[np.linspace(0, n - 1, max_windows).round().astype(np.int64)]
    return starts


@torch.no_grad()
def lm_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int = 32,
    max_windows: int | None = None,
    precision: str = "fp32",
) -> float:
    """Mean next-token loss (nats/token) over non-overlapping windows of `tokens` — deterministic, no sampling.

    >>> loss = lm_loss(model, shard.tokens, block_size=256, max_windows=640)
    """
    starts = window_starts(len(tokens), block_size, max_windows)
    if len(starts) == 0:
        raise ValueError(f"need more than {block_size + 1} tokens to evaluate, got {len(tokens)}")
    was_training = model.training
    model.eval()
    offsets = np.arange(block_size + 1)
    total, count = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            idx = starts[i : i + batch_size, None] + offsets  # (b, T+1)
            chunk = torch.from_numpy(tokens[idx].astype(np.int64))
            with autocast(precision):
                _, loss = model(chunk[:, :-1], chunk[:, 1:])
            total += loss.item() * chunk.size(0)
            count += chunk.size(0)
    finally:
        model.train(was_training)
    return total / count
