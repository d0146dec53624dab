"""Token shards: `prepare` turns a corpus into flat token-id files; `load_split` memory-maps one back.

A data directory holds `tokenizer.json`, one `<split>.bin` per split (little-endian uint16 when the vocab fits, else
uint32) and `meta.json`. Each document is written as `[bos_id] + encode(text)`: the BOS id is the only document
separator ("bos-prefix" convention). `tokens` counts every id in the file, BOS included, and `bytes_per_token` =
UTF-8 bytes of the document texts / tokens, the factor that turns loss per token into bits per byte.

>>> out = prepare("shakespeare", "bpe:4096", "data/shakespeare-bpe4k")  # doctest: +SKIP
>>> shard = load_split(out, "val")  # doctest: +SKIP
>>> len(shard.tokens), round(shard.bytes_per_token, 2)  # doctest: +SKIP
(221260, 2.93)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from slmkit import run
from slmkit.data.corpora import BUILTIN_CORPORA, Document, iter_documents, source_files, split_documents
from slmkit.errors import SlmError
from slmkit.fsutil import atomic_dir, sha256_file
from slmkit.tokenizer import Tokenizer

FORMAT = "slmkit-shards/1"
BATCH_BYTES = 1 << 20  # text per encode_batch call: enough to keep the Rust threads busy, small enough for RAM
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


@dataclass(frozen=True, eq=False)  # eq would compare the token arrays
class Shard:
    """One split of a data directory: `tokens` is a read-only memmap of its token ids."""

    name: str
    tokens: np.memmap
    meta: dict[str, Any]  # this split's entry of meta.json
    tokenizer_sha256: str
    vocab_size: int
    bos_id: int

    @property
    def bytes_per_token(self) -> float:
        return float(self.meta["bytes_per_token"])


def prepare(
    source: str,
    tokenizer: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize `source` into `out/`: tokenizer.json, train.bin, val.bin (+ out-of-domain splits), meta.json.

    `tokenizer` is a spec ("byte", "char", "bpe:4096"), trained on the train split only, or a tokenizer.json path
    (reused as is). The directory appears atomically: on any failure there is no `out`.

    >>> prepare("shakespeare", "bpe:4096", "data/shakespeare-bpe4k", progress=False)  # doctest: +SKIP
    PosixPath('data/shakespeare-bpe4k')
    """
    out = Path(out)
    corpus = BUILTIN_CORPORA.get(source)
    tok_path = tokenizer if isinstance(tokenizer, Path) or _is_path(tokenizer) else None
    run.check_out(out, overwrite=overwrite, inputs=tuple(p for p in (None if corpus else source, tok_path) if p))
    if dtype is not None and dtype not in DTYPES:
        raise SlmError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if not 0 < val_fraction < 1:
        raise SlmError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.1)")
    extra = list(corpus.extra) if corpus else []
    # Resolving the files first reports a bad source before any tokenizer training.
    files = [path for split in (None, *extra) for path, _ in source_files(source, split)]

    def main_docs() -> Iterator[tuple[str, Document]]:
        return split_documents(iter_documents(source), seed, val_fraction)

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=console, transient=True, disable=not (progress and console.is_terminal)) as bar,
        atomic_dir(out, overwrite=overwrite) as tmp,
    ):
        total = sum(p.stat().st_size for p in files)
        if tok_path is not None:
            tok = Tokenizer.load(tok_path)
        else:
            task = bar.add_task(f"training {tokenizer} tokenizer", total=None)  # reads only part of `files`
            if tokenizer == "char":
                # A char tokenizer cannot encode unseen characters, so its alphabet comes from every split it will
                # encode (val and out-of-domain too). That is an alphabet, not a fitted statistic; BPE sees train only.
                docs = chain((d for _, d in main_docs()), *(iter_documents(source, s) for s in extra))
            else:
                docs = (d for split, d in main_docs() if split == "train")
            tok = Tokenizer.train(tokenizer, _texts(docs, bar, task))
            bar.remove_task(task)
        dtype = _choose_dtype(tok.vocab_size, dtype)
        tok.save(tmp / "tokenizer.json")

        task = bar.add_task(f"encoding {source}", total=total)
        writers = {split: _SplitWriter(tmp, split, DTYPES[dtype]) for split in ("train", "val", *extra)}
        stream = chain(main_docs(), *(((s, d) for d in iter_documents(source, s)) for s in extra))
        try:
            for batch in _batches(stream):
                texts = [d.text for _, d in batch]
                for (split, _), text, ids in zip(batch, texts, tok.encode_batch(texts, bos=True), strict=True):
                    writers[split].write(ids, text)
                bar.advance(task, sum(len(t) for t in texts))
            splits = {split: w.close() for split, w in writers.items()}
        finally:
            for w in writers.values():
                w.f.close()
        for split in ("train", "val"):
            if splits[split]["documents"] == 0:
                n = splits["train"]["documents"] + splits["val"]["documents"]
                raise SlmError(
                    f"{source}: the {split} split is empty ({n} document(s) in all); add more text or files, "
                    f"or change --val-fraction (now {val_fraction})"
                )
        run.write_meta(tmp, run.new_meta(
            "data", parent=None if corpus else source,
            recipe={"source": source, "tokenizer": str(tokenizer), "val_fraction": val_fraction, "seed": seed},
            format=FORMAT,
            source=source,
            **({"package": f"{corpus.dist}=={importlib.metadata.version(corpus.dist)}"} if corpus else {}),
            dtype=dtype,
            bos_convention="bos-prefix",  # every document is [bos_id] + encode(text)
            tokenizer={"spec": tok.spec, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                       "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
            seed=seed,
            val_fraction=val_fraction,
            splits=splits,
            sources=[{"path": str(p), "sha256": sha256_file(p)} for p in files],
        ))
    return out


def _is_path(tokenizer: str) -> bool:
    """A tokenizer spec that names a tokenizer.json file rather than a kind to train."""
    return tokenizer.endswith(".json") or "/" in tokenizer or os.sep in tokenizer


def _choose_dtype(vocab_size: int, dtype: str | None) -> str:
    fits16 = vocab_size <= 65535
    if dtype == "uint16" and not fits16:
        raise SlmError(f"vocab {vocab_size} does not fit uint16 shards; use --dtype uint32 or a smaller vocab")
    return dtype or ("uint16" if fits16 else "uint32")


def _texts(docs: Iterable[Document], bar: Progress, task: Any) -> Iterator[str]:
    for doc in docs:
        bar.advance(task, len(doc.text))
        yield doc.text


def _batches(stream: Iterable[tuple[str, Document]]) -> Iterator[list[tuple[str, Document]]]:
    batch, size = [], 0
    for item in stream:
        batch.append(item)
        size += len(item[1].text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _SplitWriter:
    """Appends token ids to `<split>.bin`, hashing and counting as it goes (the ids are never all in RAM)."""

    def __init__(self, root: Path, split: str, dtype: np.dtype) -> None:
        self.file, self.dtype = f"{split}.bin", dtype
        self.f = open(root / self.file, "wb")  # noqa: SIM115 - closed in close(); atomic_dir removes it on failure
        self.sha = hashlib.sha256()
        self.tokens = self.bytes = self.documents = 0

    def write(self, ids: list[int], text: str) -> None:
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.tokens += len(ids)
        self.bytes += len(text.encode("utf-8"))
        self.documents += 1

    def close(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {
            "file": self.file,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "bytes_per_token": self.bytes / self.tokens if self.tokens else 0.0,
            "sha256": self.sha.hexdigest(),
        }


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data directory, checked for the shard format."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise SlmError(f"data directory {data_dir} does not exist; create it with `slm data prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlmError(f"{data_dir} has no meta.json: not a prepared data directory (create one with "
                       "`slm data prepare`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SlmError(f"{path} is corrupt (not JSON); re-run `slm data prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise SlmError(f"{path}: format {fmt!r} is not {FORMAT!r}; re-run `slm data prepare`")
    return meta


def load_split(data_dir: str | Path, split: str = "train") -> Shard:
    """Memory-map one split. `load_split("data/shakespeare-char", "val").tokens[:10]`."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise SlmError(f"{data_dir} has no split {split!r}; available: {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    path = data_dir / info["file"]
    dtype = DTYPES[meta["dtype"]]
    expected = info["tokens"] * dtype.itemsize
    size = path.stat().st_size if path.exists() else None
    if size != expected:
        found = "is missing" if size is None else f"has {size:,} bytes"
        raise SlmError(
            f"{path} {found} but meta.json records {info['tokens']:,} {meta['dtype']} tokens ({expected:,} bytes): "
            "the shard is truncated or corrupt; re-run `slm data prepare`"
        )
    tok = meta["tokenizer"]
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))
    return Shard(split, tokens, info, tok["sha256"], tok["vocab_size"], tok["bos_id"])


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer the shards of `data_dir` were written with (checked against meta.json's hash)."""
    meta = load_meta(data_dir)
    tok = Tokenizer.load(Path(data_dir) / "tokenizer.json")
    if tok.sha256 != meta["tokenizer"]["sha256"]:
        raise SlmError(f"{data_dir}/tokenizer.json is not the tokenizer its shards were made with (sha256 differs)")
    return tok

