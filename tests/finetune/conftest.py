"""Tiny bases to fine-tune, written as imported-style checkpoints in the test (hermetic, a few hundred KB)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from slmkit import checkpoint, run
from slmkit.config import ModelConfig
from slmkit.model import GPT
from slmkit.tokenizer import Tokenizer
from tests.conftest import WORDS

CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")
ROYAL, LOVE = WORDS[:12], WORDS[12:26]  # two disjoint vocabularies: a separable two-class task


def tiny_tokenizer(chat: bool = False) -> Tokenizer:
    tok = Tokenizer.train("bpe:300", [" ".join(WORDS)] * 20)
    if chat:  # as an imported chat model's: its specials named in a config, with a template
        tok = Tokenizer.from_str(tok.to_str(), {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True,
                                                "chat_template": CHAT_TEMPLATE})
    return tok


def make_base(path: Path, *, chat: bool = False, seed: int = 0, **fields: Any) -> Path:
    """A 2-layer Llama-style model over a small BPE vocabulary, saved as an imported checkpoint at `path`."""
    tok = tiny_tokenizer(chat)
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                         "n_embd": 32, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", **fields})
    meta = run.new_meta("import", model_class="imported", imported={"name": "tiny"})
    checkpoint.save(path, GPT(cfg).eval(), tok, meta)
    return path


def sentences(words: list[str], n: int, seed: int, length: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def labelled_dir(root: Path, n: int = 12) -> Path:
    """root/<label>/<i>.txt for the two separable classes."""
    for label, words in (("royal", ROYAL), ("love", LOVE)):
        (root / label).mkdir(parents=True)
        for i, text in enumerate(sentences(words, n, seed=len(label))):
            (root / label / f"{i:03d}.txt").write_text(text + "\n")
    return root


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("ft") / "base")


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("ft") / "chat-base", chat=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_corpus

    return make_corpus(tmp_path_factory.mktemp("ft") / "corpus", n_docs=10, words_per_doc=300)
