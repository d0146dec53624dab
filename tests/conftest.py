"""Shared fixtures: a tiny corpus and char-level shards made in-process (hermetic, a few KB)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing a shared 2-core machine

WORDS = (
    "the king is dead long live the king my lord what say you to this fair maid "
    "o romeo wherefore art thou and shall i compare thee to a summers day"
).split()


def make_corpus(root: Path, n_docs: int = 12, words_per_doc: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(words_per_doc // 8)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Char-level shards of a small synthetic corpus."""
    from slmkit.data import prepare

    root = tmp_path_factory.mktemp("tiny")
    corpus = make_corpus(root / "corpus")
    return prepare(str(corpus), "char", root / "data", val_fraction=0.2, progress=False)
