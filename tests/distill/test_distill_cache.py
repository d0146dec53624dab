"""The teacher cache: what it stores is the teacher's top-k distribution (checked against a forward pass), it reopens
memory-mapped and identical, a cache of another key is refused, an interrupted pass continues without redoing its
chunks, and the student's sampler walks the cached windows epoch by epoch, resumably."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from slmkit import checkpoint
from slmkit.data import load_split
from slmkit.distill import CacheSpec, open_cache
from slmkit.distill import cache as cache_mod
from slmkit.distill.cache import CachedWindows, build_cache, starts_sha256, window_starts
from slmkit.errors import SlmError
from slmkit.model import GPT

L = 32


def spec_for(teacher: Path, data: Path, *, windows: int | None = 12, k: int = 8, temperature: float = 1.0,
             dtype: str = "fp32", hidden: bool = False) -> tuple[CacheSpec, np.ndarray, np.ndarray]:
    shard = load_split(data, "train")
    starts = window_starts(len(shard.tokens), L, windows, seed=0)
    spec = CacheSpec(teacher="t" * 64, data=shard.meta["sha256"], seq_len=L, windows=len(starts),
                     starts=starts_sha256(starts), top_k=k, temperature=temperature, dtype=dtype, hidden=hidden,
                     precision="fp32")
    return spec, shard.tokens, starts


def teacher_model(teacher: Path) -> GPT:
    return checkpoint.load(teacher).model


def test_window_starts_are_non_overlapping_slots_all_or_a_seeded_pick():
    assert list(window_starts(100, 32, None, 0)) == [0, 32, 64]  # 3 slots of 33 tokens fit in 100
    picked = window_starts(10_000, 32, 20, seed=3)
    assert len(set(picked)) == 20 and (np.diff(picked) > 0).all() and (picked % 32 == 0).all()
    assert (picked == window_starts(10_000, 32, 20, seed=3)).all()
    assert (picked != window_starts(10_000, 32, 20, seed=4)).any()
    with pytest.raises(SlmError, match="only 3 windows"):
        window_starts(100, 32, 5, 0)
    with pytest.raises(SlmError, match="fewer than one window"):
        window_starts(20, 32, None, 0)


@pytest.mark.parametrize("hidden", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cache_holds_the_teachers_top_k_and_reopens_memory_mapped(teacher, tiny_data, tmp_path, hidden):
    spec, tokens, starts = spec_for(teacher, tiny_data, temperature=2.0, hidden=hidden)
    model = teacher_model(teacher)
    built = build_cache(tmp_path / "c", spec, lambda: model, tokens, starts, progress=False)
    again = open_cache(tmp_path / "c", spec)
    assert again is not None and isinstance(again.ids, np.memmap) and again.ids.dtype == np.int32
    for name in ("ids", "logp", "log_rest", *(["hidden"] if hidden else [])):
        assert np.array_equal(getattr(built, name), getattr(again, name))
    assert (again.hidden is None) == (not hidden)

    x = torch.from_numpy(tokens[starts[:, None] + np.arange(L)].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(x)
    lp = (logits / 2.0).log_softmax(-1)  # (N, L, V)
    top, ids = lp.topk(8, dim=-1)
    assert np.array_equal(again.ids, ids.numpy())
    assert_close(torch.from_numpy(np.array(again.logp)), top, atol=1e-5, rtol=1e-5)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    assert_close(torch.from_numpy(np.array(again.log_rest)), rest, atol=1e-5, rtol=1e-5)
    assert (json.loads((tmp_path / "c/key.json").read_text())["key"]) == spec.key


def test_fp16_storage_and_k_equal_to_the_vocabulary(teacher, tiny_data, tmp_path):
    V = teacher_model(teacher).config.vocab_size
    spec, tokens, starts = spec_for(teacher, tiny_data, windows=3, k=V, dtype="fp16")
    c = build_cache(tmp_path / "c", spec, lambda: teacher_model(teacher), tokens, starts, progress=False)
    assert c.logp.dtype == np.float16 and c.ids.shape == (3, L, V)
    assert np.isneginf(c.log_rest).all()  # nothing outside the top V
    assert np.allclose(np.exp(c.logp.astype(np.float64)).sum(-1), 1.0, atol=5e-3)


def test_a_cache_of_another_key_or_a_foreign_directory_is_refused(teacher, tiny_data, tmp_path):
    spec, tokens, starts = spec_for(teacher, tiny_data, windows=4)
    build_cache(tmp_path / "c", spec, lambda: teacher_model(teacher), tokens, starts, progress=False)
    other = CacheSpec(**{**spec.__dict__, "top_k": 4})

    def fail() -> GPT:
        raise AssertionError("the teacher must not be loaded")

    with pytest.raises(SlmError, match=r"another teacher, data or setting: top_k 8 \(here 4\)") as e:
        build_cache(tmp_path / "c", other, fail, tokens, starts, progress=False)
    assert "\n" not in str(e.value)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign/notes.txt").write_text("mine")
    with pytest.raises(SlmError, match="not a teacher cache"):
        open_cache(tmp_path / "foreign", spec)
    assert (tmp_path / "foreign/notes.txt").read_text() == "mine"


def test_an_interrupted_teacher_pass_continues_where_it_stopped(teacher, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "BATCH_TOKENS", 4 * L)  # 4 windows per chunk: 12 windows in 3 chunks
    spec, tokens, starts = spec_for(teacher, tiny_data, windows=12)
    model, calls = teacher_model(teacher), []
    forward = model.forward

    def stopped_after_one_chunk(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second chunk
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", stopped_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", spec, lambda: model, tokens, starts, progress=False)
    assert json.loads((tmp_path / "c/progress.json").read_text())["done"] == 4
    assert open_cache(tmp_path / "c", spec) is None  # incomplete: never handed to a student

    calls.clear()
    monkeypatch.setattr(model, "forward", lambda *a, **kw: (calls.append(1), forward(*a, **kw))[1])
    resumed = build_cache(tmp_path / "c", spec, lambda: model, tokens, starts, progress=False)
    assert len(calls) == 2  # the two chunks left, not the first again
    whole = build_cache(tmp_path / "whole", spec, lambda: teacher_model(teacher), tokens, starts, progress=False)
    for name in ("ids", "logp", "log_rest"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name))


def test_sampler_visits_every_window_once_per_epoch_and_resumes(teacher, tiny_data, tmp_path):
    spec, tokens, starts = spec_for(teacher, tiny_data, windows=12, hidden=True)
    c = build_cache(tmp_path / "c", spec, lambda: teacher_model(teacher), tokens, starts, progress=False)
    s = CachedWindows(c, tokens, batch_size=5, seed=7, hidden=True)
    seen = []
    for _ in range(12):  # 60 picks: exactly 5 epochs, batches crossing epoch ends
        b = s.next()
        for row in range(5):
            w = next(w for w in range(12) if np.array_equal(tokens[starts[w] : starts[w] + L], b.x[row].numpy()))
            seen.append(w)
            assert np.array_equal(b.y[row].numpy(), tokens[starts[w] + 1 : starts[w] + L + 1])
            assert np.array_equal(b.ids[row].numpy(), c.ids[w]) and np.array_equal(b.hidden[row].numpy(), c.hidden[w])
    assert np.bincount(seen, minlength=12).tolist() == [5] * 12 and s.epochs == 5.0

    a, b = CachedWindows(c, tokens, 5, seed=7), CachedWindows(c, tokens, 5, seed=7)
    for _ in range(3):
        a.next()
    b.load_state(json.loads(json.dumps(a.state())))  # as a checkpoint stores it
    assert torch.equal(a.next().x, b.next().x)
