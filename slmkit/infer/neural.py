"""The transformer behind the `LanguageModel` protocol (slmkit.model.protocol): `NeuralLM` wraps a `GPT` (native or
imported, fp32 or quantized) so evaluation, timing and `LLM` use it exactly like the n-gram model.

Scoring runs headless forward passes (the head applied only to the scored rows); generation is the inference engine
(KV cache, fused C decode). This lives in infer, not model, because generation needs the engine.

>>> lm = NeuralLM(checkpoint.load("runs/shk-small").model)  # doctest: +SKIP
>>> lm.score([(ids, 3)]), list(lm.generate(ids, SamplingParams(8, temperature=0)))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from slmkit import checkpoint, run
from slmkit.errors import SlmError
from slmkit.infer.engine import generate
from slmkit.infer.quantized import QuantExperts, QuantLinear
from slmkit.model import GPT
from slmkit.model.protocol import ParamCounts, Window
from slmkit.runtime import autocast
from slmkit.sampling import SamplingParams


class NeuralLM:
    """A `LanguageModel` over a transformer `module` (a GPT: `config.block_size`, an `lm_head`, a KV cache).

    Scoring: windows with identical inputs (e.g. the choices of a multiple-choice question with one-token answers)
    share one forward pass; the rest are sorted by length and batched (padded right — causal attention keeps padding
    out of every scored position) up to `batch_tokens` per forward; the head's log-normaliser is computed `head_rows`
    rows at a time. `precision` is the autocast of the forward ("fp32", "bf16", "auto"). `kv_cache` is the storage of
    generation's KV cache ("fp32", "bf16", "int8": slmkit.model.gpt.KVCache).
    """

    def __init__(self, module: GPT, model_class: str | None = None, *, batch_tokens: int = 4096,
                 head_rows: int = 1024, precision: str = "fp32", params: ParamCounts | None = None,
                 kv_cache: str = "fp32"):
        self.module = module.eval()
        module.new_cache(1, 1, kv=kv_cache)  # refuses a storage this model cannot decode with, now rather than later
        self.kv_cache = kv_cache
        # dense | moe | imported: recorded by whatever wrote the model, else read off its config
        self.model_class = model_class or run.model_class({"model": module.config.to_dict()})
        self.batch_tokens, self.head_rows, self.precision = batch_tokens, head_rows, precision
        # counted now: quantizing the module afterwards turns its linear weights into buffers, which are not parameters
        # (a model loaded already quantized passes the counts its fp32 parent had)
        n = module.num_params
        self._params = params or ParamCounts(n(), n(active=True), n(non_embedding=True))

    @property
    def context_length(self) -> int:
        return self.module.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.module.config.vocab_size

    def params(self) -> ParamCounts:
        return self._params

    # --- scoring ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, windows: Sequence[Window], *, context: int | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        model, T = self.module, min(context or self.context_length, self.context_length)
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
                    stop = start + max(1, self.batch_tokens // width)
                    batch = order[start:stop]
                    x = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L) padded right with id 0
                    for b, inp in enumerate(batch):
                        x[b, : len(inp)] = torch.tensor(inp)
                    with autocast(self.precision):
                        h, _ = model(x)  # (B, L, C) final hidden states
                    for b, inp in enumerate(batch):
                        members = groups[inp]
                        m = max(windows[i][1] for i in members)
                        rows = h[b, len(inp) - m : len(inp)].float()  # (m, C): the positions predicting the targets
                        logz, logits_of = _head_logz(head, rows, self.head_rows)
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

    # --- generation and storage ---------------------------------------------------------------------------------------

    def generate(self, ids: Sequence[int], params: SamplingParams, *, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        return generate(self.module, ids, params, stop_ids=stop_ids, kv=self.kv_cache)

    def save(self, directory: str | Path) -> None:
        """model.safetensors + config.json, in the checkpoint format (`slmkit.checkpoint.save` writes a whole
        checkpoint: these plus tokenizer.json and meta.json)."""
        if any(isinstance(m, QuantLinear | QuantExperts) for m in self.module.modules()):
            # its packed weights would not load back into a GPT; quantizing is a load-time choice (LLM.load(weights=))
            raise SlmError("a model with quantized weights cannot be saved; save the fp32 model and quantize at load")
        checkpoint.write_model(directory, self.module)

    @classmethod
    def load(cls, path: str | Path) -> NeuralLM:
        """What `save` wrote, a checkpoint, or a run's latest checkpoint: the weights and config (and the model class
        its meta.json records); `slmkit.api.LLM.load` also reads the tokenizer."""
        ckpt = checkpoint.resolve(path)
        return cls(checkpoint.read_model(ckpt), (run.read_meta(ckpt) if run.kind_of(ckpt) else {}).get("model_class"))


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
