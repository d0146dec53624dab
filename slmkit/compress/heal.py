"""Healing: a short continued training of a compressed model on its parent's training data, distilled from the
parent — the loss is kl_weight · KL(parent ‖ model) + (1 − kl_weight) · cross-entropy on the next tokens, as Minitron
and Sheared-LLaMA retrain a pruned model (Minitron found the parent's logits the better teacher than the labels).

The loop is the trainer's written small — random windows (slmkit.train.loop.Batcher), AdamW, warmup + cosine, gradient
clipping, a time or step budget — with two differences: each step also runs the frozen parent, and weights that
unstructured pruning zeroed are zeroed again after every optimizer step, so the mask (and the sparse storage) holds.
Every weight trains, the embeddings and norms included: they adapt to the smaller model too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slmkit import run
from slmkit.config import TrainConfig
from slmkit.data import load_split
from slmkit.errors import SlmError
from slmkit.metrics import bits_per_byte, window_starts
from slmkit.model import GPT
from slmkit.runtime import autocast, resolve_precision
from slmkit.train.loop import Batcher, _progress_bar
from slmkit.train.optim import build_optimizer, clip_gradients, lr_at, set_lr

EVAL_WINDOWS = 32  # held-out windows `compare_to_parent` scores: seconds for a small model, a stable enough figure


def distill_loss(logits: Tensor, parent_logits: Tensor, ce: Tensor, kl_weight: float) -> Tensor:
    """kl_weight · KL(parent ‖ model) per token (nats) + (1 − kl_weight) · `ce`; logits (B, T, V)."""
    logq = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)  # (B·T, V) the model being healed
    logp = F.log_softmax(parent_logits.float(), dim=-1).flatten(0, 1)  # the parent
    kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")  # Σ p (log p − log q), mean over tokens
    return kl_weight * kl + (1 - kl_weight) * ce


def heal(model: GPT, parent: GPT, data: str | Path, *, max_time: float | None = None, max_steps: int | None = None,
         kl_weight: float = 0.5, lr: float = 1e-3, batch_size: int = 16, seq_len: int = 256,
         keep_zeros: Sequence[Tensor] = (), seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Train `model` in place for `max_time` seconds and/or `max_steps` steps on the train split of the prepared data
    directory `data`, distilled from `parent` (frozen); the zeros of each tensor in `keep_zeros` (parameters of
    `model`) stay zeros. Returns what ran: steps, tokens, seconds and the settings.

    >>> heal(pruned, parent, "runs/data/shk", max_time=300, keep_zeros=list(pruned.parameters()))  # doctest: +SKIP
    """
    if max_time is None and max_steps is None:
        raise SlmError("give healing a budget: a duration (--heal 5m) or a number of steps")
    if not 0 <= kl_weight <= 1:
        raise SlmError(f"heal kl_weight={kl_weight} must be in [0, 1] (1 = the parent's logits only, 0 = labels only)")
    train = load_split(data, "train")
    T = min(seq_len, model.config.block_size, parent.config.block_size)
    tc = TrainConfig(optimizer="adamw", lr=lr, weight_decay=0.0, warmup_steps=10, batch_size=batch_size,
                     max_steps=max_steps, max_time=max_time)
    precision = resolve_precision(tc.precision)
    parent.eval().requires_grad_(False)
    masks = [(p, p != 0) for p in keep_zeros]
    model.train().requires_grad_(True)
    torch.manual_seed(seed)
    optimizer = build_optimizer(model.param_groups(0.0), tc)  # no decay: a short run has nothing to regularise
    batcher = Batcher(train.tokens, batch_size, T, seed)
    step, seconds = 0, 0.0

    def done() -> float:
        return max(step / max_steps if max_steps else 0.0, seconds / max_time if max_time else 0.0)

    with _progress_bar(progress) as bar:
        task = bar.add_task("heal", total=1.0)
        while done() < 1.0:
            t0 = time.perf_counter()
            set_lr(optimizer, tc, lr_at(tc, step, done()))
            x, y = batcher.next()
            with torch.no_grad(), autocast(precision):
                parent_logits, _ = parent(x)
            with autocast(precision):
                logits, ce = model(x, y)
            loss = distill_loss(logits, parent_logits, ce, kl_weight)
            if model.aux_loss is not None:  # MoE load balancing, as the trainer adds it
                loss = loss + model.aux_loss
            loss.backward()
            clip_gradients(optimizer, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, keep in masks:  # Adam moves every weight with a gradient; pruned ones go back to zero
                    p.mul_(keep)
            step += 1
            seconds += time.perf_counter() - t0
            bar.update(task, completed=min(1.0, done()), description=f"heal step {step} loss {loss.item():.3f}")
    model.eval().requires_grad_(False)
    return {"steps": step, "tokens": step * batch_size * T, "seconds": round(seconds, 3), "kl_weight": kl_weight,
            "lr": lr, "batch_size": batch_size, "seq_len": T, "data": str(Path(data).resolve())}


@torch.no_grad()
def compare_to_parent(model: GPT, parent: GPT, data: str | Path, *, seq_len: int = 256,
                      windows: int = EVAL_WINDOWS) -> dict[str, Any]:
    """How far `model` is from `parent` on `windows` evenly spread windows of the val split of `data`: both models'
    bits per byte and the mean KL(parent ‖ model) per token (nats). A quick figure for the stage's record;
    `slm eval RUN --kl-to parent` measures it on whole text sets."""
    val = load_split(data, "val")
    T = min(seq_len, model.config.block_size, parent.config.block_size)
    starts = window_starts(len(val.tokens), T, windows)
    if len(starts) == 0:
        raise SlmError(f"the val split of {data} has fewer than {T + 1} tokens; nothing to compare on")
    model.eval(), parent.eval()
    ce = {"model": 0.0, "parent": 0.0}
    kl, n = 0.0, 0
    for i in range(0, len(starts), 8):
        chunk = torch.from_numpy(val.tokens[starts[i : i + 8, None] + np.arange(T + 1)].astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:]  # (b, T)
        logq = F.log_softmax(model(x)[0].float(), dim=-1)  # (b, T, V)
        logp = F.log_softmax(parent(x)[0].float(), dim=-1)
        kl += float((logp.exp() * (logp - logq)).sum())
        for name, lp in (("model", logq), ("parent", logp)):
            ce[name] -= float(lp.gather(-1, y[..., None]).sum())
        n += y.numel()
    return {"val_bpb": bits_per_byte(ce["model"] / n, val.bytes_per_token),
            "parent_val_bpb": bits_per_byte(ce["parent"] / n, val.bytes_per_token), "kl_to_parent": kl / n,
            "tokens": n, "data": str(Path(data).resolve())}


def heal_data(parent_meta: dict[str, Any], tokenizer_sha256: str, given: str | Path | None, *,
              required: bool) -> Path | None:
    """The prepared data directory a compression stage heals on and compares with its parent on: `given`, or the one
    the parent was trained on, checked to be tokenized with the parent's tokenizer. None when there is none and
    healing was not asked for (an imported model then gets no quick comparison)."""
    if given is not None and not required:
        raise SlmError("--heal-data names the data healing trains on; give --heal DURATION too")
    data = given or parent_meta.get("data")
    if not data or not Path(data).exists():
        if not required:
            return None
        raise SlmError("healing trains on the parent's training data, and this model has none here (e.g. an imported "
                       "model); give a data directory prepared with its tokenizer: --heal-data DIR")
    if run.kind_of(data) != "data":
        raise SlmError(f"--heal-data {data} is not a prepared data directory (slm data prepare)")
    if load_split(data, "train").tokenizer_sha256 != tokenizer_sha256:
        raise SlmError(f"--heal-data {data} was tokenized with another tokenizer than the model's; prepare it with "
                       f"the model's tokenizer.json")
    return Path(data)


def heal_and_compare(model: GPT, parent: GPT | None, data: Path | None, *, max_time: float | None,
                     max_steps: int | None, kl_weight: float, lr: float, keep_zeros: Sequence[Tensor] = (),
                     progress: bool = False) -> dict[str, Any]:
    """The end of a compression stage: heal `model` if a budget is given, and compare it with `parent` on `data`
    (before and after healing). Returns {"heal": record | None, "quality": compare_to_parent | None}."""
    if data is None or parent is None:
        return {"heal": None, "quality": None}
    healed = None
    if max_time is not None or max_steps is not None:
        before = compare_to_parent(model, parent, data)
        healed = heal(model, parent, data, max_time=max_time, max_steps=max_steps, kl_weight=kl_weight, lr=lr,
                      keep_zeros=keep_zeros, progress=progress)
        healed["before"] = before
    return {"heal": healed, "quality": compare_to_parent(model, parent, data)}
