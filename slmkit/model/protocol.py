"""What every slmkit language model offers, whatever computes it: the `LanguageModel` protocol.

Evaluation, efficiency timing, `slm compare` and `LLM.generate` talk to models only through it, so the transformer
(through its adapter `slmkit.infer.neural.NeuralLM`, which decodes with the inference engine) and the n-gram baseline
(`slmkit.model.ngram.NgramLM`, which implements it directly) are measured by the same code. `slmkit.api.LLM.load`
returns the right implementation for a run or checkpoint directory.

>>> lm = LLM.load("runs/ngram-5").lm  # doctest: +SKIP
>>> lm.score([(ids, 3)])[0].sum(), lm.params().total, lm.context_length  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np

from slmkit.sampling import SamplingParams

# (ids, n): score the last n tokens of ids, each given every token before it in ids
Window = tuple[Sequence[int], int]


@dataclass(frozen=True)
class ParamCounts:
    """Stored parameters. `active`: what one token uses (an MoE layer counts its k routed experts, not all E);
    `non_embedding`: without the token/position embedding tables (an n-gram model has none)."""

    total: int
    active: int
    non_embedding: int


@runtime_checkable
class LanguageModel(Protocol):
    """A next-token model over token ids (tokenizers live around it)."""

    model_class: str  # dense | moe | ngram | imported: what `slm compare` groups by (slmkit.run.model_class)

    @property
    def context_length(self) -> int | None:
        """The most tokens it conditions on; None: any length of input (it reads what it needs itself)."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def params(self) -> ParamCounts: ...

    def score(self, windows: Sequence[Window], *, context: int | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """For each `(ids, n)`, the nats of the last `n` tokens of `ids` (float64, length n), each conditioned on the
        tokens before it — at most `context` of them (default and cap: `context_length`; longer inputs are cut from
        the left). `on_batch(k)` is told each time k more windows are done (a progress bar)."""
        ...

    def generate(self, ids: Sequence[int], params: SamplingParams, *,
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """New token ids one at a time after the prompt `ids`, sampled by `params` (slmkit.sampling's rules);
        ends after `params.max_new_tokens` or after yielding one of `stop_ids`."""
        ...

    def save(self, directory: str | Path) -> None:
        """Write the model's files (model.safetensors + config.json) into an existing directory."""
        ...

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read what `save` wrote (or, for the transformer, a run's latest checkpoint). Never unpickles."""
        ...
