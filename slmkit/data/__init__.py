"""Corpora, the train/val split and token shards.

>>> from slmkit.data import prepare, load_split
>>> out = prepare("shakespeare", "char", "data/shakespeare-char")  # doctest: +SKIP
>>> round(load_split(out, "val").bytes_per_token, 4)  # doctest: +SKIP
1.0
"""

from slmkit.data.corpora import BUILTIN_CORPORA, Document, iter_documents, split_documents, split_of
from slmkit.data.shards import Shard, load_meta, load_split, load_tokenizer, prepare

__all__ = [
    "BUILTIN_CORPORA",
    "Document",
    "Shard",
    "iter_documents",
    "load_meta",
    "load_split",
    "load_tokenizer",
    "prepare",
    "split_documents",
    "split_of",
]
