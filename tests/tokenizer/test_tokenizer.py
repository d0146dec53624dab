import hashlib
import json

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.errors import SlmError
from slmkit.tokenizer import SPECIALS, Tokenizer

CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\r\nOr to take arms against a sea of troubles\n",
    "Ünïcödé façade — naïve café 😀 日本語\tand\x00odd bytes\n",
] * 20 + [f"{i} squared is {i * i}; {i} cubed is {i**3}\n" for i in range(200)]
EDGE_CASES = [
    "", " ", "  leading spaces", "trailing  ", "\r\n", "\n\n\n", "\x00", "😀", "\u0301", "e\u0301", "\ufeffbom",
    "<|bos|>", "a<|eos|>b<|pad|>", "日本語", "\t\x0b\x0c", "\U0010ffff",
]

_ALPHABET = sorted(set("".join(CORPUS)))
# One-shot generators: training must stream its input in a single pass.
_BYTE = Tokenizer.train("byte", [])
_CHAR = Tokenizer.train("char", iter(CORPUS))
_BPE = Tokenizer.train("bpe:400", (t for t in CORPUS))


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {"byte": _BYTE, "char": _CHAR, "bpe": _BPE}


# Arbitrary Unicode text, surrogates excluded (a lone surrogate has no UTF-8 encoding: encode refuses it, see
# test_lone_surrogate_is_a_user_error), mixed with the fragments most likely to break a round trip: literal special
# strings, CR/LF, runs of spaces, combining marks, a BOM, astral characters.
TEXT = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",))), st.sampled_from(EDGE_CASES)),
                max_size=6).map("".join)


@given(TEXT)
@settings(max_examples=300, deadline=None)
def test_byte_ids_are_utf8_bytes_and_round_trip(s: str) -> None:
    ids = _BYTE.encode(s)
    assert ids == list(s.encode("utf-8"))
    assert _BYTE.decode(ids) == s


@given(TEXT)
@settings(max_examples=300, deadline=None)
def test_bpe_round_trip(s: str) -> None:
    ids = _BPE.encode(s)
    assert _BPE.decode(ids) == s
    assert b"".join(_BPE.token_bytes(i) for i in ids) == s.encode("utf-8")


@given(st.text(alphabet=st.sampled_from(_ALPHABET)))
@settings(max_examples=300, deadline=None)
def test_char_round_trip(s: str) -> None:
    ids = _CHAR.encode(s)
    assert len(ids) == len(s)
    assert _CHAR.decode(ids) == s


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_edge_cases_round_trip(toks: dict[str, Tokenizer], kind: str) -> None:
    tok = toks[kind]
    for s in EDGE_CASES:
        if kind == "char" and not set(s) <= set(_ALPHABET):
            continue
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
        assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8")
        assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids), "specials only ever come from bos=True"


def test_char_vocab_is_sorted_chars_then_specials(toks: dict[str, Tokenizer]) -> None:
    tok = toks["char"]
    assert tok.vocab_size == len(_ALPHABET) + 3
    assert tok.encode("".join(_ALPHABET)) == list(range(len(_ALPHABET)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (len(_ALPHABET), len(_ALPHABET) + 1, len(_ALPHABET) + 2)
    assert tok.encode("\r\n") == [_ALPHABET.index("\r"), _ALPHABET.index("\n")]
    assert tok.decode(tok.encode("to be")) == "to be"  # Fuse decoder: no spaces inserted between chars


def test_char_unknown_character_is_a_user_error(toks: dict[str, Tokenizer]) -> None:
    with pytest.raises(SlmError, match=r"character 'Z' .*only knows the characters of its training corpus.*byte or"):
        toks["char"].encode("to be Zed")
    with pytest.raises(SlmError, match="'Z'"):
        toks["char"].encode_batch(["to be", "Z"])


def test_specials_and_bos(toks: dict[str, Tokenizer]) -> None:
    byte = toks["byte"]
    assert (byte.vocab_size, byte.bos_id, byte.eos_id, byte.pad_id) == (259, 256, 257, 258)
    assert byte.encode("hi", bos=True) == [256, 104, 105]
    assert byte.encode_batch(["a", "é"], bos=True) == [[256, 97], [256, 195, 169]]
    for tok in toks.values():
        n = tok.vocab_size
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n - 3, n - 2, n - 1)
        assert tok.decode([tok.bos_id, tok.eos_id, tok.pad_id]) == "".join(SPECIALS)
        assert [tok.token_bytes(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id)] == [b"", b"", b""]
    # A literal special string in text is plain text, not the control token.
    assert byte.encode("<|bos|>") == list(b"<|bos|>")
    assert toks["bpe"].bos_id not in toks["bpe"].encode("<|bos|>")


def test_kinds_specs_and_bpe_merges(toks: dict[str, Tokenizer]) -> None:
    assert [(t.kind, t.spec) for t in toks.values()] == [("byte", "byte"), ("char", "char"), ("bpe", "bpe:400")]
    bpe = toks["bpe"]
    assert bpe.vocab_size == 400
    text = "To be, or not to be, that is the question"
    assert len(bpe.encode(text)) < len(text) // 2  # merges learned from the corpus
    assert Tokenizer.train("bpe:400", CORPUS).sha256 == bpe.sha256  # training is deterministic


def test_bpe_small_corpus_records_the_vocab_it_reached() -> None:
    tok = Tokenizer.train("bpe:5000", ["abcabc"])
    assert tok.kind == "bpe" and tok.spec == f"bpe:{tok.vocab_size}" and tok.vocab_size < 5000
    assert Tokenizer.from_str(tok.to_str()).spec == tok.spec


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_identity(toks: dict[str, Tokenizer], kind: str, tmp_path) -> None:
    tok = toks[kind]
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tok.sha256
    loaded = Tokenizer.load(path)
    fields = ("kind", "spec", "vocab_size", "sha256", "bos_id", "eos_id", "pad_id")
    assert [getattr(loaded, f) for f in fields] == [getattr(tok, f) for f in fields]
    sample = CORPUS[0] + CORPUS[1]
    assert loaded.encode(sample, bos=True) == tok.encode(sample, bos=True)
    assert Tokenizer.from_str(tok.to_str()).sha256 == tok.sha256
    # The file is a plain HF tokenizer.json: the Rust library reads it and agrees on ids (also for the byte fast path).
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.encode(sample, add_special_tokens=False).ids == tok.encode(sample)


def test_transformers_reads_the_file(toks: dict[str, Tokenizer], tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = toks["bpe"]
    tok.save(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    sample = "Whether 'tis nobler in the mind — naïve café 😀\r\n  to suffer"
    assert hf.encode(sample, add_special_tokens=False) == tok.encode(sample)
    assert hf.decode(tok.encode(sample)) == sample


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("bpe", "needs a vocab size"),
        ("bpe:100", r"must be in \[259, 1_000_000\]"),
        ("bpe:1000001", "must be in"),
        ("wordpiece", "unknown tokenizer spec 'wordpiece'; use byte, char, bpe:N"),
        ("byte:3", "unknown tokenizer spec"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(SlmError, match=match):
        Tokenizer.train(spec, ["abc"])


def test_char_needs_text() -> None:
    with pytest.raises(SlmError, match="empty text"):
        Tokenizer.train("char", [""])


def test_load_errors(tmp_path) -> None:
    with pytest.raises(SlmError, match=r"tokenizer file not found: .*nope\.json"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(SlmError, match=r"bad\.json is not a valid tokenizer\.json"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SlmError, match="not UTF-8"):
        Tokenizer.load(tmp_path / "bin.json")
    with pytest.raises(SlmError, match="is a directory"):
        Tokenizer.load(tmp_path)
    foreign = json.loads(Tokenizer.train("byte", []).to_str())
    foreign["added_tokens"] = []
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    with pytest.raises(SlmError, match=r"not an slmkit tokenizer: it has no <\|bos\|> token"):
        Tokenizer.load(tmp_path / "foreign.json")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_lone_surrogate_is_a_user_error(toks: dict[str, Tokenizer], kind: str) -> None:
    with pytest.raises(SlmError, match="not valid Unicode"):
        toks[kind].encode("a\ud800b")


def test_token_bytes_out_of_range(toks: dict[str, Tokenizer]) -> None:
    with pytest.raises(IndexError, match="outside the vocabulary"):
        toks["bpe"].token_bytes(10_000)
