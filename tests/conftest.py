"""Shared fixtures: a tiny corpus and char-level shards made in-process (hermetic, a few KB)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests are tiny; one thread avoids oversubscribing a shared 2-core machine


@pytest.fixture(autouse=True)
def _one_thread():
    """Put the thread count back after each test: the CLI and LLM.load pin it to the cores, and a later test's
    numbers (e.g. a model trained in a fixture) would then depend on which tests ran before it."""
    yield
    torch.set_num_threads(1)

WORDS = (
    "the king is dead long live the king my lord what say you to this fair maid "
    "o romeo wherefore art thou and shall i compare thee to a summers day"
).split()


def noisy_weights(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Redraw `model`'s weights large enough (matrices std 0.2, norm gains around 1, small biases) that a misplaced
    head, bias, mask or position shows in the logits and greedy decoding does not settle into repeating one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(std * noise if p.dim() > 1 else 1 + 0.1 * noise if "norm" in name and "weight" in name
                    else 0.1 * noise)
    return model


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


@pytest.fixture(scope="session")
def short_training(tiny_data: Path) -> Callable[..., tuple[float, float]]:
    """train(**config fields) → (first loss, mean of the last 5 losses) after 30 AdamW steps (aux loss included)."""
    from slmkit.config import ModelConfig
    from slmkit.data import load_split, load_tokenizer
    from slmkit.model import GPT
    from slmkit.train.loop import Batcher

    tokens = load_split(tiny_data, "train").tokens
    vocab = load_tokenizer(tiny_data).vocab_size

    def run(steps: int = 30, **fields) -> tuple[float, float]:
        torch.manual_seed(0)
        cfg = ModelConfig(**{"vocab_size": vocab, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32,
                             "pos": "rope", **fields})
        model = GPT(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        batcher = Batcher(tokens, 8, cfg.block_size, seed=0)
        losses = []
        for _ in range(steps):
            x, y = batcher.next()
            _, loss = model(x, y)
            (loss if model.aux_loss is None else loss + model.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses[0], sum(losses[-5:]) / 5

    return run
