"""Named text sets — `<corpus>:<split>` or a path — resolved to documents, for every stage that reads held-out or
calibration text (`slm eval --lm`, `slm quantize --calib`): the same document-level split `slm data prepare` makes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmkit.data.corpora import BUILTIN_CORPORA, Document, iter_documents, split_documents
from slmkit.errors import SlmError


def resolve_text_set(name: str, *, seed: int = 0, val_fraction: float = 0.1) -> tuple[list[str], dict[str, Any]]:
    """The documents of an evaluation set and a description of it.

    `name` is `<corpus>:<split>` — a built-in corpus (`shakespeare:val`, `shakespeare:folio`, `bbc-news:val`) or a
    path (`notes/:val`) — or a plain path, which is read whole. train/val are the same document-level split
    `slm data prepare` makes with this `seed` and `val_fraction` (its defaults: 0, 0.1).
    """
    source, _, split = name.rpartition(":")
    if not source or (source not in BUILTIN_CORPORA and split not in ("train", "val") and Path(name).exists()):
        source, split = name, ""
    about: dict[str, Any] = {"source": source, "split": split or None}
    if not split:
        docs = [d.text for d in iter_documents(source)]
    elif split in ("train", "val"):
        about.update(seed=seed, val_fraction=val_fraction)
        docs = [d.text for s, d in split_documents(iter_documents(source), seed, val_fraction) if s == split]
    else:
        docs = [d.text for d in _extra_split(source, split)]
    if not docs:
        raise SlmError(f"evaluation set {name!r} has no documents")
    return docs, about


def _extra_split(source: str, split: str) -> Iterator[Document]:
    if source in BUILTIN_CORPORA and split not in BUILTIN_CORPORA[source].extra:
        known = ", ".join(["train", "val", *BUILTIN_CORPORA[source].extra])
        raise SlmError(f"corpus {source!r} has no split {split!r}; use one of: {known}")
    if source not in BUILTIN_CORPORA:
        raise SlmError(f"unknown split {split!r} in {source}:{split}; a path takes :train or :val, or no split")
    return iter_documents(source, split)
