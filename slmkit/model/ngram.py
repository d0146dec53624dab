"""Interpolated (modified) Kneser-Ney n-gram language model over the token ids of slmkit shards.

The baseline that answers "is the transformer even beating counting?" in the same bits per byte.

    p_k(w | h) = max(c_k(h w) - D_k(c), 0) / c_k(h •)  +  γ_k(h) · p_{k-1}(w | h')
    γ_k(h)     = Σ_w D_k(c_k(h w)) / c_k(h •)
    p_{-1}(w)  = 1 / vocab_size                            (the uniform floor: no token has p = 0)

h' drops the most distant token of h. The highest order counts n-grams (c = raw count); lower orders count
continuations (c = number of distinct tokens seen before h w: N1+(• h w)). "modified" (Chen & Goodman 1998) uses three
discounts D1, D2, D3+ per order, chosen by the count c, estimated from that order's count-of-counts; a float uses one
discount everywhere. An unseen context passes its mass straight down (γ = 1).

Documents: a shard is `[bos] doc [bos] doc ...`. History never crosses a BOS: positions before a document's BOS read
as more BOS padding (like NLTK's `pad_both_ends`), so every n-gram lies inside one document, and the BOS that opens the
next document is scored as the end-of-document event given the end of the previous one.

Storage (numpy only, no dicts): a context of length k is an integer id, the index of its key `parent_id * V + c_k` in
the sorted array of level-k context keys (c_k = the k-th token back, parent = the context one token shorter); an n-gram
of level k is the key `context_id * V + w`. Counting is `np.unique`, lookup is `np.searchsorted`.

>>> path = train_ngram("runs/data/shk-char", "runs/ngram-5", order=5)  # doctest: +SKIP
>>> lm = NgramLM.load(path)  # doctest: +SKIP
>>> lm.evaluate(load_split("runs/data/shk-char", "val"))["bpb"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from slmkit import run
from slmkit.errors import SlmError
from slmkit.fsutil import atomic_dir, write_json
from slmkit.metrics import bits_per_byte
from slmkit.model.protocol import ParamCounts, Window
from slmkit.sampling import SamplingParams, sample_next

MAX_ORDER = 12
CHUNK = 1 << 20  # positions scored per vectorised pass: bounds the int64 temporaries to a few tens of MB


@dataclass
class NgramConfig:
    """What config.json of an n-gram run holds. `uniform=False` ends the recursion at the undiscounted unigram
    continuation distribution instead of the uniform one (NLTK's `KneserNeyInterpolated`; unseen tokens get p = 0)."""

    order: int = 5
    discount: str | float = "modified"
    vocab_size: int = 256
    bos_id: int = 0
    uniform: bool = True
    discounts: list[list[float]] = field(default_factory=list)  # per level k = 0..order-1: [D1, D2, D3+]
    model_class: str = "ngram"

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise SlmError(f"n-gram order={self.order!r} is invalid; use an integer in 1..{MAX_ORDER} (typical: 3-7)")
        if isinstance(self.discount, str):
            if self.discount != "modified":
                raise SlmError(f"n-gram discount={self.discount!r} is invalid; use 'modified' or a number in (0, 1]")
        elif not (isinstance(self.discount, int | float) and 0 < self.discount <= 1):
            raise SlmError(f"n-gram discount={self.discount!r} must be 'modified' or a number in (0, 1] (e.g. 0.75)")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise SlmError(f"n-gram vocab_size={self.vocab_size!r} must be a positive integer")
        if not 0 <= self.bos_id < self.vocab_size:
            raise SlmError(f"n-gram bos_id={self.bos_id} is outside the vocabulary of {self.vocab_size}")


def _history_starts(tokens: np.ndarray, bos: int) -> np.ndarray:
    """(N,) index of the last BOS at or before each position; 0 before the first BOS (earlier positions pad anyway)."""
    idx = np.where(tokens == bos, np.arange(len(tokens)), 0)
    return np.maximum.accumulate(idx) if len(idx) else idx


def _context_token(tokens: np.ndarray, starts: np.ndarray, pos: np.ndarray, k: int, bos: int) -> np.ndarray:
    """The k-th token back from each target position `pos`, or BOS padding where that lies before its document."""
    back = pos - k
    return np.where(back >= starts[pos - 1], tokens[np.maximum(back, 0)], bos)


def _modified_discounts(counts: np.ndarray) -> list[float]:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts n1..n4; clipped to (0, k] so every level keeps some
    mass for the next and never discounts a count below zero (tiny corpora can have n_k = 0)."""
    n = np.bincount(np.minimum(counts, 5), minlength=6)[1:5].astype(np.float64)  # n1..n4
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.5
    out = []
    for k in (1, 2, 3):
        d = k - (k + 1) * y * n[k] / n[k - 1] if n[k - 1] > 0 else y
        out.append(float(np.clip(d, 1e-3, k)))
    return out


class NgramLM:
    """A fitted n-gram model: `nll(tokens)` scores a token array, `distribution(history)` gives the next-token
    probabilities, `generate(ids, params)` samples. Build with `NgramLM.fit(...)` or `NgramLM.load(run_dir)`.
    It is a `slmkit.model.protocol.LanguageModel` itself: evaluation and timing use it like the transformer."""

    # the LanguageModel protocol: any length of input (the model cuts history to order-1 tokens itself)
    model_class = "ngram"
    context_length: int | None = None

    def __init__(self, config: NgramConfig, levels: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        """`levels[k]` = (sorted context keys, sorted n-gram keys, counts) for contexts of length k = 0..order-1."""
        if len(levels) != config.order:
            raise SlmError(f"n-gram model has {len(levels)} levels but config order {config.order}; the files are "
                           "corrupt, re-run `slm train --preset ngram-N`")
        self.config = config
        self.tokenizer_sha256: str | None = None  # set by `load` from meta.json; guards `evaluate` against other shards
        V = config.vocab_size
        self.ctx_keys, self.ngram_keys, self.counts = [], [], []
        self._alpha, self._gamma = [], []  # per n-gram: discounted count / c(h•); per context: γ(h)
        for k, (ctx, keys, counts) in enumerate(levels):
            ctx, keys, counts = (np.ascontiguousarray(a, dtype=np.int64) for a in (ctx, keys, counts))
            cid = keys // V
            total = np.bincount(cid, weights=counts, minlength=len(ctx))
            if config.discount == "modified":
                d = np.asarray([0.0, *config.discounts[k]])[np.minimum(counts, 3)]
            else:
                d = np.full(len(counts), float(config.discount))
            if k == 0 and not config.uniform:
                d[:] = 0.0  # NLTK: the unigram level is the plain continuation frequency
            self.ctx_keys.append(ctx)
            self.ngram_keys.append(keys)
            self.counts.append(counts)
            self._alpha.append(np.maximum(counts - d, 0.0) / total[cid])
            self._gamma.append(np.bincount(cid, weights=d, minlength=len(ctx)) / np.maximum(total, 1))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # --- building -----------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        tokens: np.ndarray,
        *,
        vocab_size: int,
        bos_id: int,
        order: int = 5,
        discount: str | float = "modified",
        uniform: bool = True,
    ) -> NgramLM:
        """Count the n-grams of a BOS-separated token array (e.g. `load_split(data, "train").tokens`).

        >>> lm = NgramLM.fit(shard.tokens, vocab_size=shard.vocab_size, bos_id=shard.bos_id, order=5)  # doctest: +SKIP
        """
        cfg = NgramConfig(order=order, discount=discount, vocab_size=vocab_size, bos_id=bos_id, uniform=uniform)
        toks = np.asarray(tokens).astype(np.int64)
        if len(toks) and (toks.min() < 0 or toks.max() >= vocab_size):
            raise SlmError(f"token ids outside the vocabulary of {vocab_size}; the shard and tokenizer do not match")
        if len(toks) and toks[-1] != bos_id:
            toks = np.append(toks, bos_id)  # so the last document's end is counted like every other one
        if np.count_nonzero(toks != bos_id) == 0:
            raise SlmError("cannot fit an n-gram model on an empty token array; prepare a non-empty train split")
        V, n_pos = vocab_size, len(toks) - 1
        starts = _history_starts(toks, bos_id)
        pos = np.arange(1, len(toks))  # every position but the first is a target
        w = toks[1:]
        ctx_id = np.zeros(n_pos, dtype=np.int64)
        levels: list[list[np.ndarray]] = []
        for k in range(order):
            if k == 0:
                ctx_keys = np.zeros(1, dtype=np.int64)
            else:
                c_k = _context_token(toks, starts, pos, k, bos_id)
                ctx_keys, ctx_id = np.unique(ctx_id * V + c_k, return_inverse=True)
            keys, counts = np.unique(ctx_id * V + w, return_counts=True)
            levels.append([ctx_keys, keys, counts])
        # Lower orders count continuations: N1+(• h w) = the number of level-(k+1) n-gram types whose suffix is (h, w).
        # Every position has a full padded context, so the suffixes of level k+1 are exactly the n-grams of level k.
        for k in range(order - 1):
            up_ctx, up_keys = levels[k + 1][0], levels[k + 1][1]
            parent = up_ctx // V  # the level-k context id of each level-(k+1) context
            suffix = parent[up_keys // V] * V + up_keys % V
            uniq, cont = np.unique(suffix, return_counts=True)
            assert np.array_equal(uniq, levels[k][1])
            levels[k][2] = cont
        if discount == "modified":
            cfg.discounts = [_modified_discounts(c) for _, _, c in levels]
        return cls(cfg, [(c, k, n.astype(np.int64)) for c, k, n in levels])

    # --- scoring ------------------------------------------------------------------------------------------------------

    def _probs(self, toks: np.ndarray, starts: np.ndarray, pos: np.ndarray) -> np.ndarray:
        V, bos = self.config.vocab_size, self.config.bos_id
        w = toks[pos]
        p = np.full(len(pos), 1.0 / V)
        cid = np.zeros(len(pos), dtype=np.int64)
        known = np.ones(len(pos), dtype=bool)  # the context of this length was seen in training
        for k in range(self.config.order):
            if k:
                key = cid * V + _context_token(toks, starts, pos, k, bos)
                table = self.ctx_keys[k]
                j = np.minimum(np.searchsorted(table, key), len(table) - 1)
                known &= table[j] == key
                cid = np.where(known, j, 0)
            keys = self.ngram_keys[k]
            g = cid * V + w
            j = np.minimum(np.searchsorted(keys, g), len(keys) - 1)
            hit = known & (keys[j] == g)
            p = np.where(hit, self._alpha[k][j], 0.0) + np.where(known, self._gamma[k][cid], 1.0) * p
        return p

    def nll(self, tokens: np.ndarray) -> np.ndarray:
        """(len(tokens)-1,) negative log-likelihood in nats of tokens[1:], each given up to order-1 tokens of history
        within its document (a BOS target is scored as the end of the document before it)."""
        toks = np.asarray(tokens).astype(np.int64)
        if len(toks) and (toks.min() < 0 or toks.max() >= self.config.vocab_size):
            raise SlmError(f"token ids outside the model's vocabulary of {self.config.vocab_size}")
        starts = _history_starts(toks, self.config.bos_id)
        out = np.empty(max(len(toks) - 1, 0))
        with np.errstate(divide="ignore"):  # p = 0 only without the uniform floor (NLTK mode) → inf, as it should
            for lo in range(1, len(toks), CHUNK):
                pos = np.arange(lo, min(lo + CHUNK, len(toks)))
                out[lo - 1 : pos[-1]] = -np.log(self._probs(toks, starts, pos))
        return out

    def score(self, windows: Sequence[Window], *, context: int | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """The LanguageModel protocol's scoring: nats of the last n tokens of each (ids, n). `context` is ignored:
        the model reads at most order-1 tokens of history by itself, so it is given whole documents."""
        out = []
        for ids, n in windows:
            out.append(self.nll(np.asarray(ids))[-n:])
            if on_batch is not None:
                on_batch(1)
        return out

    def evaluate(self, shard: Any, max_tokens: int | None = None) -> dict[str, float | int]:
        """Loss of a `Shard` (slmkit.data.load_split) in the eval.json "lm" schema: nats/token, perplexity, bpb."""
        if self.tokenizer_sha256 not in (None, shard.tokenizer_sha256):
            raise SlmError(f"split {shard.name!r} was made with another tokenizer than this n-gram model")
        tokens = shard.tokens if max_tokens is None else shard.tokens[: max_tokens + 1]
        if len(tokens) < 2:
            raise SlmError(f"split {shard.name!r} has {len(tokens)} token(s); need at least 2 to evaluate")
        loss = float(self.nll(tokens).mean())
        n = len(tokens) - 1
        return {"loss_nats_per_token": loss, "perplexity": math.exp(loss),
                "bpb": bits_per_byte(loss, shard.bytes_per_token), "tokens": n,
                "bytes": round(n * shard.bytes_per_token)}

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """(vocab_size,) next-token probabilities after `history` (only its current document, last order-1 tokens)."""
        V, bos = self.config.vocab_size, self.config.bos_id
        hist = [int(t) for t in history[-(self.config.order - 1):]] if self.config.order > 1 else []
        if bos in hist:
            hist = hist[len(hist) - 1 - hist[::-1].index(bos):]
        p = np.full(V, 1.0 / V)
        cid = 0
        for k in range(self.config.order):
            if k:
                key = cid * V + (hist[-k] if k <= len(hist) else bos)
                table = self.ctx_keys[k]
                j = int(np.searchsorted(table, key))
                if j == len(table) or table[j] != key:
                    break  # unseen context: γ = 1 here and for every longer one
                cid = j
            keys = self.ngram_keys[k]
            lo, hi = np.searchsorted(keys, [cid * V, (cid + 1) * V])
            p *= self._gamma[k][cid]
            p[keys[lo:hi] % V] += self._alpha[k][lo:hi]
        return p

    def generate(self, ids: Sequence[int], params: SamplingParams | None = None, *,
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yield new token ids one at a time after `ids` (an empty prompt starts a document); stops after yielding a
        stop id. Same sampling rules as the transformer's engine (temperature, top-k, top-p on log-probabilities)."""
        p = params or SamplingParams()
        if any(not 0 <= int(t) < self.config.vocab_size for t in ids):
            raise SlmError(f"prompt holds token ids outside the model's vocabulary of {self.config.vocab_size}")
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        ids = [int(t) for t in ids] or [self.config.bos_id]
        for _ in range(p.max_new_tokens):
            with np.errstate(divide="ignore"):
                logits = torch.from_numpy(np.log(self.distribution(ids)))
            nxt = sample_next(logits, torch.tensor(ids), p, gen)
            yield nxt
            if nxt in stop_ids:
                return
            ids.append(nxt)

    # --- size and storage ---------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Stored numbers: one count per n-gram plus one key per context (the model's "parameters")."""
        return sum(len(k) + len(c) for k, c in zip(self.ngram_keys, self.ctx_keys, strict=True))

    def params(self) -> ParamCounts:
        """Every stored number is used by every token, and none is an embedding."""
        n = self.num_params()
        return ParamCounts(total=n, active=n, non_embedding=n)

    def save(self, directory: str | Path) -> None:
        """Write model.safetensors + config.json into an existing directory (callers make it atomic)."""
        directory = Path(directory)
        arrays = {}
        for k in range(self.config.order):
            arrays[f"level{k}.context_keys"] = self.ctx_keys[k]
            arrays[f"level{k}.ngram_keys"] = self.ngram_keys[k]
            arrays[f"level{k}.counts"] = self.counts[k].astype(np.int32 if self.counts[k].max() < 2**31 else np.int64)
        save_file(arrays, str(directory / "model.safetensors"), metadata={"format": "slmkit-ngram/1"})
        write_json(directory / "config.json", asdict(self.config))

    @classmethod
    def load(cls, path: str | Path) -> NgramLM:
        """Load an n-gram run directory (model.safetensors + config.json). Never unpickles."""
        import json

        path = Path(path)
        try:
            cfg = json.loads((path / "config.json").read_text())
            arrays = load_file(str(path / "model.safetensors"))
        except FileNotFoundError as e:
            raise SlmError(f"{path} is not an n-gram run: missing {Path(e.filename).name}") from None
        except (json.JSONDecodeError, SafetensorError, OSError) as e:
            raise SlmError(f"cannot read n-gram model in {path}: {e}; the files are corrupt, re-train it") from None
        try:
            config = NgramConfig(**cfg)
            levels = [(arrays[f"level{k}.context_keys"], arrays[f"level{k}.ngram_keys"], arrays[f"level{k}.counts"])
                      for k in range(config.order)]
        except (TypeError, KeyError) as e:
            raise SlmError(f"n-gram model in {path} does not match its config.json ({e}); re-train it") from None
        lm = cls(config, levels)
        if (path / "meta.json").exists():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                lm.tokenizer_sha256 = json.loads((path / "meta.json").read_text())["data_meta"]["tokenizer_sha256"]
        return lm


def train_ngram(
    data: str | Path,
    out: str | Path,
    order: int = 5,
    discount: str | float = "modified",
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Count an n-gram model on `data`'s train split, score its val split, and write the run directory `out`:
    model.safetensors, config.json, tokenizer.json, meta.json (with "model_class": "ngram" and the val result).

    >>> train_ngram("runs/data/shk-char", "runs/ngram-5", order=5)  # doctest: +SKIP
    PosixPath('runs/ngram-5')
    """
    from slmkit.data import load_meta, load_split, load_tokenizer

    data, out = Path(data), Path(out)
    run.check_out(out, overwrite=overwrite, inputs=(data,))
    NgramConfig(order=order, discount=discount)  # a bad order/discount fails before any counting
    data_meta = load_meta(data)
    train_shard, val_shard = load_split(data, "train"), load_split(data, "val")
    load_tokenizer(data)  # checks tokenizer.json against the shards' hash
    say = print if progress else (lambda *a, **k: None)
    say(f"counting {order}-grams of {len(train_shard.tokens):,} tokens ...")
    t0 = time.perf_counter()
    lm = NgramLM.fit(train_shard.tokens, vocab_size=train_shard.vocab_size, bos_id=train_shard.bos_id, order=order,
                     discount=discount)
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    val = lm.evaluate(val_shard)
    eval_time = time.perf_counter() - t0
    say(f"counted in {train_time:.1f}s; val {val['loss_nats_per_token']:.4f} nats/token, {val['bpb']:.4f} bpb "
        f"(scored in {eval_time:.1f}s)")
    meta = run.new_meta(
        "ngram", parent=data, model_class="ngram", recipe={"order": order, "discount": discount},
        data=str(data.resolve()),
        data_meta={"tokenizer_sha256": train_shard.tokenizer_sha256, "bytes_per_token": val_shard.bytes_per_token,
                   "train_sha256": train_shard.meta.get("sha256"), "train_tokens": len(train_shard.tokens),
                   "source": data_meta.get("source"), "tokenizer": data_meta["tokenizer"]["spec"]},
        model=asdict(lm.config),
        params={"total": lm.num_params(), "ngrams": [len(k) for k in lm.ngram_keys]},
        status="finished",
        result={"step": 0, "tokens": len(train_shard.tokens), "train_time": train_time,
                "tokens_per_s": len(train_shard.tokens) / max(train_time, 1e-9), "val_loss":
                val["loss_nats_per_token"], "val_bpb": val["bpb"], "num_params": lm.num_params(),
                "eval_time": eval_time, "status": "finished"},
    )
    with atomic_dir(out, overwrite=True) as tmp:
        lm.save(tmp)
        shutil.copyfile(data / "tokenizer.json", tmp / "tokenizer.json")
        run.write_meta(tmp, meta)
    return out
