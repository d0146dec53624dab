"""The teacher cache: the teacher's top-k next-token distribution at every position of a fixed set of training
windows, computed once (the expensive pass) and read, memory-mapped, by every student distilled from it.

    CACHE/key.json       what the cache is of (CacheSpec: the teacher's meta.json hash, the train shard's hash, the
                         windows, k, temperature, storage) and its key, the hash of all that; written first
    CACHE/starts.npy     (N,) int64: window w is train tokens [starts[w], starts[w] + L]: inputs [:L], targets [1:]
    CACHE/ids.npy        (N, L, k) int32: the teacher's top-k token ids at each input position, most likely first
    CACHE/logp.npy       (N, L, k) float16 | float32: their log-probabilities at the temperature
    CACHE/log_rest.npy   (N, L) float32: log of the teacher's mass outside its top k (−inf when k = V); stored as a
                         log so a tail of 1e-9 keeps its digits (1 − Σ p_i would cancel)
    CACHE/hidden.npy     (N, L, C) float16: the teacher's final hidden states (after its last norm), for hidden-state
                         matching only — C/(3k) times the bytes of the top-k arrays at fp16
    CACHE/progress.json  {"done": windows written, "seconds": teacher time so far}, rewritten atomically after each
                         chunk of windows once the chunk is flushed: an interrupted pass continues from there

The windows: the train split cut into non-overlapping slots of L + 1 tokens (slot j starts at j·L; consecutive slots
share one boundary token, a target of one and the first input of the next); all of them, or `windows` of them picked
by a seeded draw (then sorted). Their starts are hashed into the key, so a cache is only ever reused for exactly the
positions it holds. A directory whose key.json names another key is refused with one line (never overwritten or
silently reused); one without key.json must be empty or absent.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slmkit.errors import SlmError
from slmkit.fsutil import write_json
from slmkit.infer.neural import _headless
from slmkit.model import GPT
from slmkit.runtime import autocast, console

FORMAT = "slmkit-teacher-cache/1"
LOGP_DTYPES = {"fp16": np.float16, "fp32": np.float32}
BATCH_TOKENS = 4096  # tokens per teacher forward: large enough for efficient matmuls, small enough for its activations
HEAD_ROWS = 1024  # positions per head matmul: bounds the (rows, V) fp32 logits held at once


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached numbers depend on; `key` hashes it."""

    teacher: str  # sha256 of the teacher checkpoint's meta.json
    data: str  # sha256 of the train shard
    seq_len: int
    windows: int
    starts: str  # sha256 of the window starts (int64 bytes)
    top_k: int
    temperature: float
    dtype: str  # log-prob storage: fp16 | fp32
    hidden: bool  # teacher hidden states stored too
    precision: str  # autocast of the teacher's body (its head always runs in fp32)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def window_starts(n_tokens: int, seq_len: int, windows: int | None, seed: int) -> np.ndarray:
    """Starts of the cached windows (module docstring): every slot of L + 1 tokens, or `windows` seeded picks."""
    slots = (n_tokens - 1) // seq_len
    if slots < 1:
        raise SlmError(f"the train split has {n_tokens} tokens, fewer than one window of {seq_len + 1}; use more data "
                       f"or a student with a smaller block_size")
    if windows is None or windows == slots:
        return np.arange(slots, dtype=np.int64) * seq_len
    if windows > slots:
        raise SlmError(f"windows={windows}: the train split holds only {slots} windows of {seq_len + 1} tokens; give "
                       f"at most {slots} (or leave it unset for all)")
    picked = np.random.default_rng(seed).choice(slots, size=windows, replace=False)
    return np.sort(picked).astype(np.int64) * seq_len


def starts_sha256(starts: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(starts, dtype="<i8").tobytes()).hexdigest()


class TeacherCache:
    """An open, complete cache: memory-mapped arrays (module docstring) and its spec."""

    def __init__(self, path: Path, spec: CacheSpec, seconds: float):
        self.path, self.spec, self.seconds = path, spec, seconds  # seconds: the teacher pass, all invocations
        self.starts = np.load(path / "starts.npy")
        arrays = _open_arrays(path, spec, mode="r")
        self.ids, self.logp, self.log_rest = arrays["ids"], arrays["logp"], arrays["log_rest"]
        self.hidden = arrays.get("hidden")

    def __len__(self) -> int:
        return len(self.starts)


def _shapes(spec: CacheSpec, width: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    N, L, k = spec.windows, spec.seq_len, spec.top_k
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "ids": ((N, L, k), np.int32), "logp": ((N, L, k), LOGP_DTYPES[spec.dtype]), "log_rest": ((N, L), np.float32)}
    if spec.hidden:
        shapes["hidden"] = ((N, L, width), np.float16)
    return shapes


def _create_arrays(path: Path, spec: CacheSpec, width: int) -> dict[str, np.ndarray]:
    """The cache's arrays as new .npy files, preallocated (sparse until written) and memory-mapped for writing."""
    return {name: np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            for name, (shape, dtype) in _shapes(spec, width).items()}


def _open_arrays(path: Path, spec: CacheSpec, mode: str) -> dict[str, np.ndarray]:
    """The cache's arrays, memory-mapped ("r" or "r+") and checked against the spec."""
    out = {}
    for name in _shapes(spec, 0):
        file = path / f"{name}.npy"
        try:
            out[name] = np.load(file, mmap_mode=mode)
        except (OSError, ValueError) as e:
            raise SlmError(f"teacher cache {path}: cannot read {file.name} ({e}); remove the directory to rebuild "
                           f"it") from None
    width = out["hidden"].shape[-1] if "hidden" in out else 0
    for name, (shape, dtype) in _shapes(spec, width).items():
        if out[name].shape != shape or out[name].dtype != np.dtype(dtype):
            raise SlmError(f"teacher cache {path}: {name}.npy is {out[name].dtype}{list(out[name].shape)}, not what "
                           f"key.json describes; remove the directory to rebuild it")
    return out


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _check_key(path: Path, spec: CacheSpec) -> bool:
    """True when `path` already belongs to this spec's cache; False when it is free to create one in (absent or
    empty). Anything else is a one-line error naming what differs."""
    found = _read_json(path / "key.json")
    if found is None:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise SlmError(f"{path} is not a teacher cache (no key.json) and is not empty; choose another --cache")
        return False
    if found.get("key") == spec.key:
        return True
    theirs = found.get("spec", {})
    diff = [f"{k} {theirs.get(k)!r} (here {v!r})" for k, v in asdict(spec).items() if theirs.get(k) != v]
    raise SlmError(f"teacher cache {path} was built for another teacher, data or setting: {', '.join(diff[:3])}; "
                   f"choose another --cache directory (or remove this one)")


def open_cache(path: str | Path, spec: CacheSpec) -> TeacherCache | None:
    """The complete cache of `spec` at `path`, or None when the teacher pass has not finished there (or not
    started). A cache of another spec is a one-line error."""
    path = Path(path)
    if not _check_key(path, spec):
        return None
    progress = _read_json(path / "progress.json")
    if progress is None or progress.get("done") != spec.windows:
        return None
    return TeacherCache(path, spec, progress.get("seconds", 0.0))


def build_cache(path: str | Path, spec: CacheSpec, teacher: Callable[[], GPT], tokens: np.ndarray,
                starts: np.ndarray, *, progress: bool = True) -> TeacherCache:
    """Open the cache of `spec` at `path`, running (or continuing) the teacher pass first if it is not complete.
    `teacher()` loads the teacher model; it is called only when there is something left to compute."""
    path = Path(path)
    if starts_sha256(starts) != spec.starts or len(starts) != spec.windows:
        raise ValueError("the window starts do not match the spec")
    done = open_cache(path, spec)
    if done is not None:
        return done
    model = teacher().eval()
    state = _read_json(path / "progress.json") if (path / "key.json").exists() else None
    if state is None:  # a new cache, or one interrupted before its arrays were all created: (re)create them
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "key.json", {"format": FORMAT, "key": spec.key, "spec": asdict(spec)})  # claims the dir
        np.save(path / "starts.npy", starts)
        arrays = _create_arrays(path, spec, model.config.n_embd)
        state = {"done": 0, "seconds": 0.0}
        write_json(path / "progress.json", state)
    else:
        arrays = _open_arrays(path, spec, "r+")
    try:
        _teacher_pass(model, tokens, starts, spec, arrays, path, state, progress)
    except KeyboardInterrupt:
        console().print(f"teacher pass stopped at {state['done']}/{spec.windows} windows ({path}); the same command "
                        f"continues it")
        raise
    return TeacherCache(path, spec, state["seconds"])


@torch.inference_mode()
def _teacher_pass(model: GPT, tokens: np.ndarray, starts: np.ndarray, spec: CacheSpec, arrays: dict[str, np.ndarray],
                  path: Path, state: dict[str, Any], progress: bool) -> None:
    L, k, tau = spec.seq_len, spec.top_k, spec.temperature
    V = model.config.vocab_size
    chunk = max(1, BATCH_TOKENS // L)  # windows per forward (and per progress record)
    offsets = np.arange(L)
    con = console()
    columns = (TextColumn("[bold]teacher"), BarColumn(), TextColumn("{task.completed}/{task.total} windows"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=con, disable=not (progress and con.is_terminal)) as bar:
        task = bar.add_task("", total=spec.windows, completed=state["done"])
        for c0 in range(state["done"], spec.windows, chunk):
            t0 = time.perf_counter()
            c1 = min(spec.windows, c0 + chunk)
            x = torch.from_numpy(tokens[starts[c0:c1, None] + offsets].astype(np.int64))  # (b, L)
            with _headless(model) as head:
                with autocast(spec.precision):
                    h, _ = model(x)  # (b, L, C) final hidden states
                rows = h.float().reshape(-1, h.size(-1))  # (b·L, C)
                ids, logp, rest = [], [], []
                for r in range(0, len(rows), HEAD_ROWS):
                    # the head in fp32 whatever the body's precision: the log-probs are what the students learn
                    lp = (head(rows[r : r + HEAD_ROWS]) / tau).log_softmax(-1)  # (rows, V)
                    top, idx = lp.topk(k, dim=-1)
                    ids.append(idx)
                    logp.append(top)
                    rest.append(torch.logsumexp(lp.scatter(-1, idx, float("-inf")), -1) if k < V else
                                torch.full((len(lp),), float("-inf")))
            b = c1 - c0
            arrays["ids"][c0:c1] = torch.cat(ids).view(b, L, k).numpy()
            arrays["logp"][c0:c1] = torch.cat(logp).view(b, L, k).numpy()
            arrays["log_rest"][c0:c1] = torch.cat(rest).view(b, L).numpy()
            if "hidden" in arrays:
                arrays["hidden"][c0:c1] = h.float().numpy()
            for arr in arrays.values():
                arr.flush()  # on disk before progress.json says so
            state["done"], state["seconds"] = c1, round(state["seconds"] + time.perf_counter() - t0, 3)
            write_json(path / "progress.json", state)
            bar.update(task, completed=c1)


@dataclass
class DistillBatch:
    """One batch of cached windows: the student's inputs and targets, and the teacher's cache rows for them."""

    x: torch.Tensor  # (B, L) input ids
    y: torch.Tensor  # (B, L) next-token ids (hard labels)
    ids: torch.Tensor  # (B, L, k) int32
    logp: torch.Tensor  # (B, L, k) float16 | float32
    log_rest: torch.Tensor  # (B, L) float32
    hidden: torch.Tensor | None  # (B, L, C_teacher) float16, with hidden-state matching


class CachedWindows:
    """Batches of a cache's windows for the trainer (slm distill's Batcher). Each epoch visits every window once, in
    an order drawn from (seed, epoch); a batch that runs past the end of an epoch continues into the next. The state
    is (epoch, position), so a resumed run sees exactly the batches an uninterrupted one would have."""

    def __init__(self, cache: TeacherCache, tokens: np.ndarray, batch_size: int, seed: int, hidden: bool = False):
        if hidden and cache.hidden is None:
            raise ValueError("this cache holds no hidden states")
        self.cache, self.tokens, self.B, self.seed, self.hidden = cache, tokens, batch_size, seed, hidden
        self.epoch = self.pos = 0
        self.offsets = np.arange(cache.spec.seq_len + 1)
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.cache))
            self._perm_epoch = self.epoch
        return self._perm

    @property
    def epochs(self) -> float:
        """Passes over the cached windows so far."""
        return self.epoch + self.pos / len(self.cache)

    def next(self) -> DistillBatch:
        picks, need = [], self.B
        while need:
            take = self._order()[self.pos : self.pos + need]
            picks.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == len(self.cache):
                self.epoch, self.pos = self.epoch + 1, 0
        idx = np.sort(np.concatenate(picks))  # in file order: the memory-mapped rows are read front to back
        c = self.cache
        win = torch.from_numpy(self.tokens[c.starts[idx, None] + self.offsets].astype(np.int64))  # (B, L + 1)
        hidden = torch.from_numpy(c.hidden[idx]) if self.hidden else None
        return DistillBatch(win[:, :-1], win[:, 1:], torch.from_numpy(c.ids[idx]), torch.from_numpy(c.logp[idx]),
                            torch.from_numpy(c.log_rest[idx]), hidden)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
