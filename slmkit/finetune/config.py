"""`FinetuneConfig`: what to adapt and how. The optimisation (lr, batch, budget, precision, threads) is an ordinary
`TrainConfig`, with defaults suited to adapting a pretrained model (`default_train_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmkit.config import TrainConfig, _check, _check_choice, _Serializable
from slmkit.errors import SlmError

Task = Literal["lm", "classify", "chat"]
Method = Literal["full", "lora", "frozen"]
BaseWeights = Literal["fp32", "int8"]


@dataclass
class FinetuneConfig(_Serializable):
    """task: lm (continued pretraining on text), classify (a head on pooled hidden states), chat (conversations, loss
    on assistant replies). method: full (every weight), lora (low-rank adapters on a frozen base), frozen (classify
    only: the head alone)."""

    # fields a resumed run may change besides TrainConfig.RESUMABLE
    RESUMABLE = ("patience",)

    task: Task = "lm"
    method: Method = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # roles: attn, mlp, attn.qkv, mlp.fc...
    lora_layers: int | None = None  # adapt only the top N blocks (backward stops below them); None = every block
    # LoRA+ (Hayou et al. 2024): B, the zero-initialised factor, learns at lora_plus × the lr; A at the lr. 1 = LoRA
    lora_plus: float = 1.0
    # write the full model (a LoRA update merged into the base weights); False: only what was trained (adapter, head)
    # plus the lineage to the base, which must stay where it is
    merge: bool = True
    base_weights: BaseWeights = "fp32"  # int8: LoRA/frozen over a base quantized to int8 (a quarter of the memory)
    seq_len: int = 256  # tokens per training row: lm windows; chat and classify rows are cut to it
    val_fraction: float = 0.1  # held out for early stopping and the best checkpoint
    test_fraction: float = 0.1  # classify: held out for the reported accuracy and macro-F1 (0: report on val)
    split_seed: int = 0  # the held-out split of classify/chat data, and of a corpus prepared on the fly
    patience: int | None = 5  # evaluations without a better val loss before stopping early; None = never
    grad_checkpoint: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    head_lr: float = 1e-3  # classify: peak lr of the new head (full fine-tuning's small body lr would barely move it)

    def __post_init__(self) -> None:
        for name, kind in (("task", Task), ("method", Method), ("base_weights", BaseWeights)):
            _check_choice(self, name, kind)
        _check(self.lora_rank >= 1, f"FinetuneConfig.lora_rank={self.lora_rank} must be >= 1")
        _check(self.lora_alpha > 0, f"FinetuneConfig.lora_alpha={self.lora_alpha} must be positive")
        _check(0 <= self.lora_dropout < 1, f"FinetuneConfig.lora_dropout={self.lora_dropout} must be in [0, 1)")
        _check(self.lora_plus >= 1, f"FinetuneConfig.lora_plus={self.lora_plus} must be >= 1 (1 = plain LoRA)")
        _check(bool(self.lora_targets), "FinetuneConfig.lora_targets must name at least one module (attn, mlp, ...)")
        _check(self.lora_layers is None or self.lora_layers >= 1,
               f"FinetuneConfig.lora_layers={self.lora_layers} must be >= 1 (or unset: every block)")
        _check(self.seq_len >= 2, f"FinetuneConfig.seq_len={self.seq_len} must be >= 2")
        _check(0 < self.val_fraction < 1, f"FinetuneConfig.val_fraction={self.val_fraction} must be in (0, 1)")
        _check(0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
               f"FinetuneConfig.test_fraction={self.test_fraction} must be in [0, 1), with val_fraction below 1")
        _check(self.patience is None or self.patience >= 1, f"FinetuneConfig.patience={self.patience} must be >= 1")
        _check(self.head_lr > 0, f"FinetuneConfig.head_lr={self.head_lr} must be positive")
        if self.method == "frozen" and self.task != "classify":
            raise SlmError(f"--method frozen trains only a classification head; --task {self.task} needs lora or full")
        if not self.merge and self.method == "full":
            raise SlmError("full fine-tuning changes every weight, so it always writes the whole model; --adapter-only "
                           "is for --method lora (or frozen)")
        if self.lora_layers is not None and self.method != "lora":
            raise SlmError(f"--lora-layers picks the blocks LoRA adapts; --method {self.method} has no adapters "
                           "(use --method lora)")
        if self.lora_plus != 1 and self.method != "lora":
            raise SlmError(f"--lora-plus scales the learning rate of LoRA's B factors; --method {self.method} has none "
                           "(use --method lora)")
        if self.base_weights == "int8" and self.method == "full":
            raise SlmError("--base-weights int8 keeps the base frozen; use it with --method lora or frozen")


# Adapting a pretrained model wants far smaller steps than training from scratch (TrainConfig's lr 3e-3): LoRA's
# zero-initialised update tolerates 1e-3; full fine-tuning moves every pretrained weight, so 5e-5
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5, "frozen": 1e-3}


def default_train_config(method: str = "lora", **overrides: object) -> TrainConfig:
    """TrainConfig defaults for fine-tuning with `method`: its lr, batches of 8 rows, a short warmup, no weight decay
    (it would pull LoRA factors and pretrained weights toward zero, not toward the base), an evaluation every 50
    steps on 64 held-out windows, AdamW."""
    if method not in DEFAULT_LR:
        raise SlmError(f"method {method!r} is not one of {', '.join(DEFAULT_LR)}")
    base = dict(lr=DEFAULT_LR[method], batch_size=8, warmup_steps=20, weight_decay=0.0, eval_interval=50,
                eval_windows=64, ckpt_interval=200, log_interval=10)
    return TrainConfig.from_dict({**TrainConfig().to_dict(), **base, **overrides})
