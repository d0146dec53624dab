"""The Kneser-Ney n-gram baseline: equal to NLTK's KneserNeyInterpolated, normalised, document-aware, round-trips, and
a `LanguageModel` like the transformer."""

import random

import numpy as np
import pytest

from slmkit import LLM, SlmError
from slmkit.cli import main
from slmkit.data import load_split
from slmkit.model.ngram import NgramLM, _modified_discounts, train_ngram
from slmkit.model.protocol import LanguageModel, ParamCounts
from slmkit.sampling import SamplingParams

WORDS = "the king is dead long live the king my lord what say you to this fair maid".split()
V, BOS = len(WORDS) + 2, len(WORDS)  # one id (V-1) never occurs in any text


def _docs(n: int, seed: int, lo: int = 1, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(len(WORDS)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _stream(docs: list[list[int]]) -> np.ndarray:
    return np.array([t for d in docs for t in (BOS, *d)], dtype=np.int64)


def _padded_ngrams(docs: list[list[int]], order: int) -> list[list[tuple[str, ...]]]:
    """Reference n-gram extraction, one plain loop per document: n-1 BOS of padding in front, the next document's BOS
    as the end event, and every suffix of each full n-gram (the lower orders NLTK's counter needs)."""
    sents = []
    for d in docs:
        seq = [BOS] * (order - 1) + d + [BOS]
        grams = []
        for i in range(order - 1, len(seq)):
            full = tuple(str(t) for t in seq[i - order + 1 : i + 1])
            grams += [full[-m:] for m in range(1, order + 1)]
        sents.append(grams)
    return sents


@pytest.mark.parametrize(("order", "discount"), [(2, 0.1), (3, 0.1), (3, 0.75), (4, 0.5)])
def test_matches_nltk_kneser_ney_interpolated(order, discount):
    from nltk.lm import KneserNeyInterpolated

    train_docs, test_docs = _docs(25, seed=0), _docs(6, seed=1, lo=5, hi=12)
    lm = NgramLM.fit(_stream(train_docs), vocab_size=V, bos_id=BOS, order=order, discount=discount, uniform=False)
    ref = KneserNeyInterpolated(order, discount=discount)
    ref.fit(_padded_ngrams(train_docs, order), [str(t) for t in range(V)])
    expected = []
    for d in test_docs:
        seq = [BOS] * (order - 1) + d + [BOS]
        for i in range(order - 1, len(seq)):
            expected.append(ref.unmasked_score(str(seq[i]), tuple(str(t) for t in seq[i - order + 1 : i])))
    got = np.exp(-lm.nll(_stream(test_docs)))  # tokens[1:]: the last document has no end event
    assert len(got) == len(expected) - 1
    np.testing.assert_allclose(got, expected[:-1], rtol=1e-12, atol=1e-15)
    assert len(set(np.round(got, 9))) > 10  # the comparison covers many distinct probabilities, not a constant


@pytest.mark.parametrize("discount", ["modified", 0.75])
@pytest.mark.parametrize("order", [1, 3, 5])
def test_probabilities_sum_to_one_and_match_nll(order, discount):
    lm = NgramLM.fit(_stream(_docs(30, seed=2)), vocab_size=V, bos_id=BOS, order=order, discount=discount)
    rng = np.random.default_rng(0)
    for _ in range(30):  # random histories: seen, partly seen and never-seen contexts, with and without a BOS inside
        hist = rng.integers(0, V - 1, size=rng.integers(0, 8)).tolist()
        p = lm.distribution(hist)
        assert p.shape == (V,) and p.min() > 0
        assert abs(p.sum() - 1) < 1e-12
        w = int(rng.integers(0, V))
        tokens = np.array([*hist, w]) if hist else np.array([BOS, w])
        assert np.isclose(-np.log(p[w]), lm.nll(tokens)[-1], rtol=1e-12)


def test_unseen_tokens_get_nonzero_probability():
    lm = NgramLM.fit(_stream(_docs(10, seed=3)), vocab_size=V, bos_id=BOS, order=4)
    never = V - 1
    nll = lm.nll(np.array([BOS, 0, 1, never, never, 2]))
    assert np.all(np.isfinite(nll)) and nll[2] > nll[1]
    assert lm.distribution([BOS, 0, 1])[never] > 0


def test_modified_discounts_follow_chen_goodman():
    counts = np.array([1] * 40 + [2] * 20 + [3] * 10 + [4] * 5 + [9] * 3)
    n1, n2, n3, n4 = 40, 20, 10, 5
    y = n1 / (n1 + 2 * n2)
    expected = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
    np.testing.assert_allclose(_modified_discounts(counts), expected)
    d = _modified_discounts(np.array([1, 1, 1]))  # n2 = n3 = n4 = 0: still usable discounts in (0, k]
    assert all(0 < x <= k for x, k in zip(d, (1, 2, 3), strict=True))


def test_documents_do_not_leak_into_each_other():
    docs = _docs(12, seed=4)
    a = NgramLM.fit(_stream(docs), vocab_size=V, bos_id=BOS, order=5)
    b = NgramLM.fit(_stream(docs[::-1]), vocab_size=V, bos_id=BOS, order=5)
    for k in range(5):  # counting per document: reordering the documents changes nothing
        np.testing.assert_array_equal(a.ngram_keys[k], b.ngram_keys[k])
        np.testing.assert_array_equal(a.counts[k], b.counts[k])
    doc = [3, 1, 4, 1, 5]
    one = a.nll(_stream([[0, 7, 7, 2], doc]))[-len(doc):]
    other = a.nll(_stream([[9, 9, 9, 9, 9, 9, 9, 1], doc]))[-len(doc):]
    np.testing.assert_array_equal(one, other)  # a BOS resets the history
    np.testing.assert_allclose(one, a.nll(_stream([doc]))[-len(doc):])


@pytest.mark.parametrize("bad", [dict(order=0), dict(order=13), dict(discount=1.5), dict(discount=0.0),
                                 dict(discount="kn")])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(SlmError):
        NgramLM.fit(_stream(_docs(3, seed=5)), vocab_size=V, bos_id=BOS, **bad)


@pytest.mark.parametrize("tokens", [np.array([], dtype=np.int64), np.array([BOS, BOS]), np.array([0, V + 5])])
def test_empty_or_foreign_tokens_are_user_errors(tokens):
    with pytest.raises(SlmError):
        NgramLM.fit(tokens, vocab_size=V, bos_id=BOS, order=3)


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return train_ngram(tiny_data, tmp_path_factory.mktemp("ngram") / "run", order=4)


def test_run_round_trips_and_records_its_result(run, tiny_data):
    train, val = load_split(tiny_data, "train"), load_split(tiny_data, "val")
    fresh = NgramLM.fit(train.tokens, vocab_size=train.vocab_size, bos_id=train.bos_id, order=4)
    loaded = NgramLM.load(run)
    assert loaded.config == fresh.config and loaded.config.discounts
    np.testing.assert_array_equal(loaded.nll(val.tokens), fresh.nll(val.tokens))
    meta = LLM.load(run).meta
    assert meta["model_class"] == "ngram" and meta["params"]["total"] == loaded.num_params()
    res = loaded.evaluate(val)
    assert res["bpb"] == pytest.approx(meta["result"]["val_bpb"])
    assert res["bpb"] < np.log2(train.vocab_size)  # far better than uniform over the alphabet
    assert {p.name for p in run.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json", "meta.json"}
    with pytest.raises(SlmError, match="already exists"):
        train_ngram(tiny_data, run, order=3)


def test_llm_generates_from_an_ngram_run(run):
    llm = LLM.load(run)
    a = llm.generate("the king", max_new_tokens=40, temperature=0.8, seed=1)
    assert a == llm.generate("the king", max_new_tokens=40, temperature=0.8, seed=1) and len(a) > 0
    greedy = llm.generate("the king", max_new_tokens=30, temperature=0)
    assert greedy == llm.generate("the king", max_new_tokens=30, temperature=0)
    assert any(w in greedy for w in WORDS if len(w) > 2)  # the corpus's words, not noise


def test_the_model_speaks_the_language_model_protocol(run, tiny_data):
    lm = NgramLM.load(run)
    assert isinstance(lm, LanguageModel) and lm.model_class == "ngram" and lm.context_length is None
    shard = load_split(tiny_data, "val")
    val = shard.tokens[:60]
    short, whole = lm.score([(val[:30].tolist(), 4), (val.tolist(), 59)], context=8)  # no window: context is moot
    np.testing.assert_array_equal(short, lm.nll(val[:30])[-4:])
    np.testing.assert_array_equal(whole, lm.nll(val))
    n = lm.num_params()
    assert lm.params() == ParamCounts(total=n, active=n, non_embedding=n) and lm.vocab_size == shard.vocab_size
    params = SamplingParams(25, temperature=0.8, top_k=5, seed=3)
    a = list(lm.generate([lm.config.bos_id], params))
    assert a == list(lm.generate([lm.config.bos_id], params)) and 0 < len(a) <= 25
    stop = a[3]
    assert list(lm.generate([lm.config.bos_id], params, stop_ids=[stop])) == a[: a.index(stop) + 1]
    with pytest.raises(SlmError, match="no weights to quantize"):
        LLM.load(run, weights="int8")


def test_corrupt_run_is_a_user_error(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in run.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SlmError, match="corrupt"):
        NgramLM.load(bad)


def test_cli_trains_and_generates_ngram(tiny_data, tmp_path, capsys):
    out = tmp_path / "ng"
    assert main(["train", "--data", str(tiny_data), "--preset", "ngram", "--set", "order=3", "--set",
                 "discount=0.75", "--out", str(out), "--quiet"]) == 0
    assert "3-gram" in capsys.readouterr().out
    assert NgramLM.load(out).config.discount == 0.75
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "20", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(["train", "--data", str(tiny_data), "--preset", "ngram-3", "--set", "n_layer=2",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--data", str(tiny_data), "--preset", "ngram", "--set", "order=0",
                 "--out", str(tmp_path / "y")]) == 2
