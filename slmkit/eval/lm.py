"""Language-modelling quality: loss (nats/token), perplexity and bits per byte, on shards or on held-out text.

Two evaluators share one unit, bits per UTF-8 byte of the scored text, so byte/char/BPE/imported models compare:

- `slmkit.metrics.lm_loss`: mean loss over non-overlapping windows of a shard (the trainer's fast, fixed-cost eval).
- `evaluate_text`: every token of every document scored exactly once with as much left context as the model allows
  (a sliding window with a configurable stride, as in HF's perplexity guide), for `slm eval`.

The sliding window talks to the model only through a `Scorer`: token ids in, per-token nats out. A transformer and an
n-gram model are both scorers, so both are evaluated by the same code on the same text.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.data.corpora import BUILTIN_CORPORA, Document, iter_documents, split_documents
from slmkit.errors import SlmError
from slmkit.runtime import autocast

# (ids, n): score the last n tokens of ids, each given every token before it in ids
Window = tuple[Sequence[int], int]


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


@contextlib.contextmanager
def _headless(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily make `model(idx)` return the final hidden states (B, T, C) instead of logits, yielding the head.

    Why: full logits are B·T·V floats — 1.6 GB for one 8k-token window at a 49k vocab — but only the scored positions
    need them, so the head is applied afterwards to those rows, in chunks.
    """
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head  # the same module object: a tied head stays tied


def gpt_scorer(model: torch.nn.Module, *, context: int | None = None, batch_tokens: int = 4096, head_rows: int = 1024,
               precision: str = "fp32", on_batch: Callable[[int], None] | None = None) -> Scorer:
    """A `Scorer` for a transformer with `config.block_size` and an `lm_head` (slmkit's GPT and imported models).

    `context` caps the tokens of context (default and maximum: block_size; attention cost grows with its square, so
    a long-context model may be cheaper to evaluate at 1-2k). Longer windows are truncated from the left. Windows with
    identical inputs (e.g. the choices of a multiple-choice question with one-token answers) share one forward pass;
    the rest are sorted by length and batched (padded right — causal attention keeps padding out of every scored
    position) up to `batch_tokens` per forward. `on_batch(k)` is called after each forward with the number of windows
    it finished.
    """
    T = min(context or model.config.block_size, model.config.block_size)

    @torch.no_grad()
    def nats(windows: Sequence[Window]) -> list[np.ndarray]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ids, n) in enumerate(windows):
            if not 1 <= n < len(ids):
                raise ValueError(f"window {i}: cannot score {n} of {len(ids)} tokens (the first token has no context)")
            if n > T:
                raise SlmError(f"a continuation of {n} tokens does not fit the model's context of {T} tokens")
            groups.setdefault(tuple(ids[-(T + 1) :][:-1]), []).append(i)
        order = sorted(groups, key=len, reverse=True)
        out: list[np.ndarray] = [np.empty(0)] * len(windows)
        was_training = model.training
        model.eval()
        try:
            with _headless(model) as head:
                start = 0
                while start < len(order):
                    width = len(order[start])  # longest in this batch: sorted, so the first
                    stop = start + max(1, batch_tokens // width)
                    batch = order[start:stop]
                    x = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L) padded right with id 0
                    for b, inp in enumerate(batch):
                        x[b, : len(inp)] = torch.tensor(inp)
                    with autocast(precision):
                        h, _ = model(x)  # (B, L, C) final hidden states
                    for b, inp in enumerate(batch):
                        members = groups[inp]
                        m = max(windows[i][1] for i in members)
                        rows = h[b, len(inp) - m : len(inp)].float()  # (m, C): the positions predicting the targets
                        logz, logits_of = _head_logz(head, rows, head_rows)
                        for i in members:
                            ids, n = windows[i]
                            tgt = torch.tensor(list(ids[-n:]), dtype=torch.long)
                            r = torch.arange(m - n, m)
                            out[i] = (logz[r] - logits_of(r, tgt)).double().numpy()
                    if on_batch is not None:
                        on_batch(sum(len(groups[inp]) for inp in batch))
                    start = stop
        finally:
            model.train(was_training)
        return out

    return Scorer(nats, T)


def nll_scorer(nll: Callable[[np.ndarray], np.ndarray], *, on_batch: Callable[[int], None] | None = None) -> Scorer:
    """A `Scorer` from a function mapping a token array to the nats of tokens[1:] given their prefix, such as
    `NgramLM.nll`. It has no context limit, so it is given whole documents."""

    def nats(windows: Sequence[Window]) -> list[np.ndarray]:
        out = []
        for ids, n in windows:
            out.append(np.asarray(nll(np.asarray(ids)), dtype=np.float64)[-n:])
            if on_batch is not None:
                on_batch(1)
        return out

    return Scorer(nats, None)


def _head_logz(head: torch.nn.Module, rows: torch.Tensor, chunk: int) -> tuple[torch.Tensor, Callable]:
    """log Σ exp(logits) per row, plus a gather of chosen logits, computing at most `chunk` rows of logits at a time."""
    if len(rows) <= chunk:
        logits = head(rows).float()  # (m, V)
        return torch.logsumexp(logits, dim=-1), lambda r, t: logits[r, t]
    logz = torch.cat([torch.logsumexp(head(rows[i : i + chunk]).float(), dim=-1) for i in range(0, len(rows), chunk)])

    def logits_of(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = head.weight if isinstance(head, torch.nn.Linear) and head.bias is None else None
        if w is not None:  # one dot product per row: no (m, V) tensor at all
            return (rows[r] * w[t].float()).sum(-1)
        return torch.cat([head(rows[r[i : i + chunk]]).float().gather(1, t[i : i + chunk, None])[:, 0]
                          for i in range(0, len(r), chunk)])

    return logz, logits_of


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


def evaluate_docs(scorer: Scorer, docs: Iterable[TextDoc], *, stride: int | None = None) -> dict[str, float | int]:
    """Sliding-window loss over documents: {"loss_nats_per_token", "perplexity", "bpb", "tokens", "bytes", "documents"}.

    `stride` defaults to half the scorer's context (HF's perplexity guide); each document starts a fresh context.
    """
    stride = stride or max(1, (scorer.context or 2) // 2)
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


# --- named held-out sets --------------------------------------------------------------------------------------------


def resolve_text_set(name: str, *, seed: int = 0, val_fraction: float = 0.1) -> tuple[list[str], dict[str, Any]]:
    """The documents of an evaluation set and a description of it.

    `name` is `<corpus>:<split>` — a built-in corpus (`shakespeare:val`, `shakespeare:folio`, `bbc-news:val`) or a
    path (`notes/:val`) — or a plain path, which is read whole. train/val are the same document-level split
    `slm data prepare` makes with this `seed` and `val_fraction` (its defaults: 0, 0.1).
    """
    source, _, split = name.rpartition(":")
    if not source or (source not in BUILTIN_CORPORA and split not in ("train", "val") and Path(name).exists()):
        source, split = name, ""
    about: dict[str, Any] = {"source": source, "split": split or None}
    if not split:
        docs = [d.text for d in iter_documents(source)]
    elif split in ("train", "val"):
        about.update(seed=seed, val_fraction=val_fraction)
        docs = [d.text for s, d in split_documents(iter_documents(source), seed, val_fraction) if s == split]
    else:
        docs = [d.text for d in _extra_split(source, split)]
    if not docs:
        raise SlmError(f"evaluation set {name!r} has no documents")
    return docs, about


def _extra_split(source: str, split: str) -> Iterator[Document]:
    if source in BUILTIN_CORPORA and split not in BUILTIN_CORPORA[source].extra:
        known = ", ".join(["train", "val", *BUILTIN_CORPORA[source].extra])
        raise SlmError(f"corpus {source!r} has no split {split!r}; use one of: {known}")
    if source not in BUILTIN_CORPORA:
        raise SlmError(f"unknown split {split!r} in {source}:{split}; a path takes :train or :val, or no split")
    return iter_documents(source, split)
