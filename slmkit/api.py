"""The Python API: `LLM.load(path).generate("...")`.

>>> from slmkit import LLM
>>> llm = LLM.load("runs/shk-small")
>>> print(llm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=0))
>>> for piece in llm.stream("JULIET:", max_new_tokens=50):
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from slmkit import checkpoint
from slmkit.compress.quantize import WeightDtype, quantize
from slmkit.config import ModelConfig
from slmkit.infer.engine import SamplingParams, generate
from slmkit.model import GPT
from slmkit.model.ngram import NgramLM, is_ngram_run
from slmkit.runtime import set_threads
from slmkit.tokenizer import Tokenizer


class LLM:
    """A model with its tokenizer, ready to generate text."""

    def __init__(self, model: GPT | NgramLM, tokenizer: Tokenizer, meta: dict[str, Any] | None = None,
                 path: Path | None = None):
        model = model if isinstance(model, NgramLM) else model.eval()
        self.model, self.tokenizer, self.meta, self.path = model, tokenizer, meta or {}, path

    @classmethod
    def load(cls, path: str | Path, *, threads: int | None = None, weights: WeightDtype = "fp32") -> LLM:
        """Load a checkpoint directory or a run directory (its latest checkpoint).

        weights: "int8" or "bf16" quantize the linear layers for inference (slmkit.compress.quantize): 4x / 2x fewer
        bytes read per generated token: SmolLM2-135M decoded 2.8-4.3x / 2.0-2.1x faster than fp32 on two 2-core
        machines (docs/benchmarks.md).
        """
        set_threads(threads)
        if is_ngram_run(path):  # an n-gram baseline run (slm train --preset ngram-5): no torch weights
            path = Path(path)
            return cls(NgramLM.load(path), Tokenizer.load(path / "tokenizer.json"),
                       checkpoint.read_json(path / "meta.json"), path)
        ckpt = checkpoint.load(path)
        return cls(quantize(ckpt.model, weights), ckpt.tokenizer, ckpt.meta, ckpt.path)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        chat: bool = False,
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is generated.

        Generation ends at `max_new_tokens`, at the tokenizer's EOS/end-of-turn tokens (and, for slmkit's own
        tokenizers, at a BOS, which marks the start of a new document), or
        just before the first occurrence of any `stop` string (which is not yielded). `chat=True` sends `prompt` as a
        user message through the tokenizer's chat template (models imported with one) and yields the reply.
        """
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        tok = self.tokenizer
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok.encode(text, bos=tok.add_bos, specials=True)
        else:
            ids = tok.encode(prompt, bos=tok.add_bos) or [tok.bos_id]  # at least one token to condition on
        # bytes → text incrementally, so a multi-byte character split across tokens is never printed half-way
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s) for s in stop), default=1) - 1  # text that might still become a stop string
        text, emitted = "", 0
        # stop ids: EOS and end-of-turn tokens; for slmkit's own tokenizers also BOS, which starts a new document
        if isinstance(self.model, NgramLM):
            tokens = self.model.generate(ids, **dataclasses.asdict(params), stop_ids=tuple(tok.stop_ids))
        else:
            tokens = generate(self.model, ids, params, stop_ids=tuple(tok.stop_ids))
        for nxt in tokens:
            if nxt in tok.stop_ids or nxt == tok.pad_id:
                break
            text += utf8.decode(tok.token_bytes(nxt))
            cut = min((i for s in stop if (i := text.find(s, max(0, emitted - len(s)))) >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            if len(text) - hold > emitted:
                yield text[emitted : len(text) - hold]
                emitted = len(text) - hold
        text += utf8.decode(b"", final=True)
        if len(text) > emitted:
            yield text[emitted:]

    def generate(self, prompt: str, **kwargs: Any) -> str:
        """The continuation of `prompt` as one string (same arguments as `stream`)."""
        return "".join(self.stream(prompt, **kwargs))
