"""Sliding-window language-model evaluation: every token scored once, checked against lm_loss and a hand computation
with the model's own logits; bits per byte from the real UTF-8 byte count; named held-out sets = training's split."""

import math

import numpy as np
import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.data.textsets import resolve_text_set
from slmkit.eval.lm import (
    TextDoc,
    encode_documents,
    evaluate_docs,
    gpt_scorer,
    sliding_windows,
)
from slmkit.metrics import lm_loss
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer


def tiny_model(vocab: int = 50, block: int = 8, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16, **kw)
    return GPT(cfg).eval()


@torch.no_grad()
def hand_nats(model: GPT, ids: list[int], t: int, start: int) -> float:
    """nats of ids[t] given ids[start:t], from the plain forward pass."""
    logits, _ = model(torch.tensor([ids[start:t]]))
    return float(-torch.log_softmax(logits[0, -1].double(), -1)[ids[t]])


@pytest.mark.parametrize(("n", "context", "stride"), [(10, 4, 2), (9, 4, 4), (2, 4, 1), (30, 8, 3), (5, None, 1)])
def test_windows_score_each_token_once_with_enough_context(n, context, stride):
    prev, seen = 1, []
    for s, e in sliding_windows(n, context, stride):
        assert context is None or e - s <= context + 1
        new = list(range(prev, e))
        if context is not None and prev > 1:  # later windows: every new target sees >= context - stride tokens
            assert all(t - s >= context - stride for t in new)
        seen += new
        prev = e
    assert seen == list(range(1, n))


def test_stride_equal_to_block_is_lm_loss():
    model = tiny_model(block=8)
    tokens = np.random.default_rng(0).integers(0, 50, size=8 * 5 + 1)
    doc = TextDoc(tokens.tolist(), bytes=100)
    res = evaluate_docs(gpt_scorer(model), [doc], stride=8)
    assert res["tokens"] == 40
    assert res["loss_nats_per_token"] == pytest.approx(lm_loss(model, tokens, block_size=8), abs=1e-5)


def test_stride_one_gives_every_token_the_full_context():
    model = tiny_model(block=6, pos="rope", norm="rmsnorm", mlp="swiglu")
    ids = np.random.default_rng(1).integers(0, 50, size=20).tolist()
    expect = [hand_nats(model, ids, t, max(0, t - 6)) for t in range(1, 20)]
    res = evaluate_docs(gpt_scorer(model), [TextDoc(ids, bytes=37)], stride=1)
    assert res["loss_nats_per_token"] == pytest.approx(np.mean(expect), abs=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(np.mean(expect)), rel=1e-5)


def test_batching_and_head_chunking_do_not_change_scores():
    model = tiny_model(block=8)
    rng = np.random.default_rng(2)
    windows = [(rng.integers(0, 50, size=k).tolist(), min(3, k - 1)) for k in (2, 9, 5, 9, 3, 7)]
    windows.append(([*windows[1][0][:-1], 7], 1))  # same input as window 1 (a second "choice"): shares its forward
    one = gpt_scorer(model, batch_tokens=1).nats(windows)
    big = gpt_scorer(model, batch_tokens=1000, head_rows=1).nats(windows)
    for w, a, b in zip(windows, one, big, strict=True):
        ids, n = w
        expect = [hand_nats(model, ids, t, 0) for t in range(len(ids) - n, len(ids))]
        np.testing.assert_allclose(a, expect, atol=1e-5)
        np.testing.assert_allclose(b, expect, atol=1e-5)


def test_long_windows_are_truncated_from_the_left():
    model = tiny_model(block=4)
    ids = list(range(10))
    (got,) = gpt_scorer(model).nats([(ids, 2)])
    np.testing.assert_allclose(got, [hand_nats(model, ids, t, 5) for t in (8, 9)], atol=1e-5)
    wide = tiny_model(block=8)  # a context cap below block_size truncates the same way
    (got,) = gpt_scorer(wide, context=4).nats([(ids, 2)])
    np.testing.assert_allclose(got, [hand_nats(wide, ids, t, 5) for t in (8, 9)], atol=1e-5)


def test_bpb_counts_real_utf8_bytes():
    texts = ["héllo wörld, ça va? " * 20, "naïve café — déjà vu. " * 15]
    tok = Tokenizer.train("bpe:300", texts)
    model = tiny_model(vocab=tok.vocab_size, block=16)
    docs = list(encode_documents(tok, texts))
    assert [d.ids[0] for d in docs] == [tok.bos_id] * 2  # slmkit tokenizers: documents start with BOS
    res = evaluate_docs(gpt_scorer(model), docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert res["bytes"] == n_bytes > sum(len(t) for t in texts)
    assert res["tokens"] == sum(len(d.ids) - 1 for d in docs)
    assert res["bpb"] == pytest.approx(res["loss_nats_per_token"] / math.log(2) * res["tokens"] / n_bytes)


def test_without_bos_the_first_token_and_its_bytes_are_not_scored():
    tok = Tokenizer.train("byte", [])
    tok.add_bos = False  # as an imported tokenizer that prepends nothing
    (doc,) = encode_documents(tok, ["é abc"])
    assert doc.ids == list("é abc".encode()) and doc.bytes == 6 - 1  # the first byte of "é" has no context


def test_named_sets_use_the_training_split(tiny_data):
    from slmkit.data import load_meta

    meta = load_meta(tiny_data)
    corpus = tiny_data.parent / "corpus"
    texts, about = resolve_text_set(f"{corpus}:val", seed=meta["seed"], val_fraction=meta["val_fraction"])
    assert about["split"] == "val" and len(texts) == meta["splits"]["val"]["documents"]
    assert sum(len(t.encode()) for t in texts) == meta["splits"]["val"]["bytes"]
    whole, about = resolve_text_set(str(corpus))  # a plain path: every document
    assert about["split"] is None and len(whole) == sum(s["documents"] for s in meta["splits"].values())


@pytest.mark.parametrize("name", ["shakespeare:val", "shakespeare:folio", "bbc-news:val"])
def test_builtin_sets_resolve(name):
    from slmkit.data import iter_documents
    from slmkit.errors import SlmError

    try:
        texts, _ = resolve_text_set(name)
    except SlmError as e:
        if "pip install" in str(e):
            pytest.skip(str(e))
        raise
    assert texts and all(texts)
    if name.endswith(":val"):  # the ~10% of documents held out
        n_all = sum(1 for _ in iter_documents(name.split(":")[0]))
        assert 0 < len(texts) < n_all / 3


def test_bad_set_names_are_one_line_errors(tmp_path):
    from slmkit.errors import SlmError

    with pytest.raises(SlmError, match="has no split 'nope'"):
        resolve_text_set("shakespeare:nope")
    with pytest.raises(SlmError, match="does not exist"):
        resolve_text_set(str(tmp_path / "missing.txt"))
