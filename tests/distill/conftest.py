"""A tiny teacher trained on the char-level `tiny_data` shards in-process (so it shares their tokenizer), and the
small configs the distillation tests train students with."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmkit.config import ModelConfig, TrainConfig

# the student is narrower than the teacher, so hidden-state matching needs its projection
TEACHER = ModelConfig(n_layer=2, n_head=4, n_embd=48, block_size=32, pos="rope", norm="rmsnorm", mlp="swiglu")
STUDENT = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, pos="rope", norm="rmsnorm", mlp="swiglu")


def tcfg(**kw) -> TrainConfig:
    base = dict(max_steps=30, batch_size=8, eval_interval=10, eval_batches=4, ckpt_interval=10, log_interval=5,
                warmup_steps=5, lr=3e-3, threads=1, precision="fp32", keep_checkpoints=5)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmkit.train import train

    out = tmp_path_factory.mktemp("distill") / "teacher"
    train(tiny_data, out, TEACHER, tcfg(max_steps=80, eval_interval=80, ckpt_interval=80), progress=False)
    return out
