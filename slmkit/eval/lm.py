"""Language-modelling quality: loss (nats/token), perplexity and bits per byte, on shards or on held-out text.

Two evaluators share one unit, bits per UTF-8 byte of the scored text, so byte/char/BPE/imported models compare:

- `slmkit.metrics.lm_loss`: mean loss over non-overlapping windows of a shard (the trainer's fast, fixed-cost eval).
- `evaluate_docs`: every token of every document scored exactly once with as much left context as the model allows
  (a sliding window with a configurable stride, as in HF's perplexity guide), for `slm eval`.

The sliding window talks to the model only through a `Scorer`: token ids in, per-token nats out, made from any
`slmkit.model.protocol.LanguageModel`, so a transformer and an n-gram model are evaluated by the same code on the same
text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slmkit.errors import SlmError
from slmkit.infer.neural import NeuralLM
from slmkit.model.protocol import LanguageModel, Window

# --- scorers: token ids in, per-token nats out ---------------------------------------------------------------------


@dataclass
class Scorer:
    """Per-token negative log-likelihoods of a model.

    `nats(windows)` returns, for each `(ids, n)`, the nats of the last `n` tokens of `ids` (float64 array of length n),
    each conditioned on all tokens before it in `ids`. `context` is the most tokens the model can condition on
    (None: unbounded, e.g. an n-gram model, which is then given whole documents).
    """

    nats: Callable[[Sequence[Window]], list[np.ndarray]]
    context: int | None


def scorer(model: LanguageModel, *, context: int | None = None,
           on_batch: Callable[[int], None] | None = None) -> Scorer:
    """The `Scorer` of any `LanguageModel`, its context capped at `context` tokens (default: the model's own; a
    long-context transformer is cheaper to evaluate at 1-2k, as attention cost grows with the square)."""
    own = model.context_length
    T = own if not context or own is None else min(context, own)
    return Scorer(lambda windows: model.score(windows, context=T, on_batch=on_batch), T)


def gpt_scorer(model: torch.nn.Module, *, context: int | None = None, batch_tokens: int = 4096, head_rows: int = 1024,
               precision: str = "fp32", on_batch: Callable[[int], None] | None = None) -> Scorer:
    """The `Scorer` of a bare transformer (slmkit's GPT or an imported one): `scorer(NeuralLM(model, ...))`."""
    return scorer(NeuralLM(model, batch_tokens=batch_tokens, head_rows=head_rows, precision=precision),
                  context=context, on_batch=on_batch)


# --- sliding-window evaluation of documents ------------------------------------------------------------------------


def sliding_windows(n_tokens: int, context: int | None, stride: int) -> list[tuple[int, int]]:
    """(start, end) slices of a document of `n_tokens` ids; window k scores ids[end_{k-1}:end_k] given ids[start:...].

    Every token but the first is scored exactly once; each window ends `stride` targets after the previous one and
    reaches back as far as the context allows, so every target sees at least `context - stride` tokens of context.
    With stride == context the windows are lm_loss's non-overlapping (context+1)-token windows.

    >>> sliding_windows(10, 4, 2)
    [(0, 5), (2, 7), (4, 9), (5, 10)]
    """
    if n_tokens < 2:
        return []
    if context is None:
        return [(0, n_tokens)]
    if not 1 <= stride <= context:
        raise SlmError(f"stride={stride} must be between 1 and the context length {context}")
    out, end = [], min(context + 1, n_tokens)
    out.append((0, end))
    while end < n_tokens:
        end = min(end + stride, n_tokens)
        out.append((max(0, end - context - 1), end))
    return out


@dataclass
class TextDoc:
    """A document ready to score: `ids` (BOS first when the tokenizer adds one), the scored token count and bytes."""

    ids: list[int]
    bytes: int  # UTF-8 bytes of the text the scored tokens stand for


def encode_documents(tokenizer: Any, texts: Iterable[str]) -> Iterator[TextDoc]:
    """Tokenize documents as training does: `[bos] + encode(text)` when `tokenizer.add_bos` (slmkit's default).

    Without a BOS the first token has nothing to be predicted from, so it is not scored and its bytes are not counted.
    """
    add_bos = getattr(tokenizer, "add_bos", True)
    batch: list[str] = []

    def flush() -> Iterator[TextDoc]:
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            n_bytes = len(text.encode("utf-8"))
            if add_bos:
                ids = [tokenizer.bos_id, *ids]
            elif ids:
                n_bytes -= len(tokenizer.token_bytes(ids[0]))
            if len(ids) >= 2:
                yield TextDoc(ids, n_bytes)
        batch.clear()

    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= 1 << 20:
            yield from flush()
            size = 0
    yield from flush()


def default_stride(context: int | None) -> int:
    """Half the context (HF's perplexity guide): every target sees at least half a window of context."""
    return max(1, (context or 2) // 2)


def evaluate_docs(scorer: Scorer, docs: Iterable[TextDoc], *, stride: int | None = None) -> dict[str, float | int]:
    """Sliding-window loss over documents: {"loss_nats_per_token", "perplexity", "bpb", "tokens", "bytes", "documents"}.

    `stride` defaults to `default_stride` of the scorer's context; each document starts a fresh context.
    """
    stride = stride or default_stride(scorer.context)
    windows: list[Window] = []
    n_bytes = n_docs = 0
    for doc in docs:
        prev = 1
        for s, e in sliding_windows(len(doc.ids), scorer.context, stride):
            windows.append((doc.ids[s:e], e - prev))
            prev = e
        n_bytes += doc.bytes
        n_docs += 1
    if not windows:
        raise SlmError("no text to evaluate: every document is shorter than two tokens")
    total = sum(float(x.sum()) for x in scorer.nats(windows))
    tokens = sum(n for _, n in windows)
    loss = total / tokens
    return {
        "loss_nats_per_token": loss,
        "perplexity": math.exp(loss),
        "bpb": total / math.log(2) / n_bytes,
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": n_docs,
    }
