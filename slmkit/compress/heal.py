"""Healing: a short continued training of a compressed model on its parent's training data, distilled from the
parent — the loss is kl_weight · KL(parent ‖ model) + (1 − kl_weight) · cross-entropy on the next tokens, as Minitron
and Sheared-LLaMA retrain a pruned model (Minitron found the parent's logits the better teacher than the labels).

The loop is the trainer's written small — random windows (slmkit.train.loop.Batcher), AdamW, warmup + cosine, gradient
clipping, a time or step budget — with two differences: each step also runs the frozen parent, and weights that
unstructured pruning zeroed are zeroed again after every optimizer step, so the mask (and the sparse storage) holds.
Every weight trains, the embeddings and norms included: they adapt to the smaller model too.

Gradual pruning (`slm prune --gradual`) runs here too: instead of healing a model pruned once, the loop prunes the
matrices of `keep_zeros` by magnitude as it trains, to the sparsity of Zhu & Gupta's cubic schedule ("To prune, or not
to prune", 2017): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³, the masks recomputed every Δt steps and held (pruned
weights re-zeroed after every optimizer step) in between. t is the share of the budget spent (steps or seconds), so a
time budget works as a step budget does; after t0 + nΔt the model trains at the final sparsity, recovering.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta's gradual pruning schedule over a training budget: sparsity `initial` until `start`, rising as a
    cubic to `final` at `end` (shares of the budget: t0 and t0 + nΔt), then `final`; masks recomputed every `every`
    steps (Δt). Fast at first, while there are many redundant weights, slowly near the end.

    >>> CubicSchedule(0.9).sparsity(0.375)  # halfway to end=0.75: 0.9 · (1 − 0.5³)
    0.7875
    """

    final: float
    initial: float = 0.0
    start: float = 0.0
    end: float = 0.75
    every: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.initial <= self.final < 1:
            raise SlmError(f"gradual pruning needs 0 <= initial sparsity ({self.initial}) <= final ({self.final}) < 1")
        if not 0 <= self.start < self.end <= 1:
            raise SlmError(f"gradual pruning: start {self.start} and end {self.end} must satisfy 0 <= start < end <= 1 "
                           f"(shares of the budget)")
        if self.every < 1:
            raise SlmError(f"gradual pruning: every={self.every} must be at least one step")

    def sparsity(self, progress: float) -> float:
        """s_t at `progress` (the share of the budget spent, 0..1)."""
        f = min(1.0, max(0.0, (progress - self.start) / (self.end - self.start)))
        return self.final + (self.initial - self.final) * (1 - f) ** 3


def magnitude_keep(w: Tensor, s: float) -> Tensor:
    """True for the weights of `w` that magnitude pruning to sparsity `s` keeps: all but the smallest |w| of each
    matrix (the last two dims; per expert of an (E, in, out) stack). A k-th value threshold, not a sort, since the
    gradual schedule recomputes it every few steps; ties at the threshold go too (exact ties are the zeros already
    pruned, or rare)."""
    flat = w.detach().abs().flatten(-2)
    k = int(s * flat.shape[-1])
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    return (flat > flat.kthvalue(k, dim=-1, keepdim=True).values).view(w.shape)


def distill_loss(logits: Tensor, parent_logits: Tensor, ce: Tensor, kl_weight: float) -> Tensor:
    """kl_weight · KL(parent ‖ model) per token (nats) + (1 − kl_weight) · `ce`; logits (B, T, V)."""
    logq = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)  # (B·T, V) the model being healed
    logp = F.log_softmax(parent_logits.float(), dim=-1).flatten(0, 1)  # the parent
    kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")  # Σ p (log p − log q), mean over tokens
    return kl_weight * kl + (1 - kl_weight) * ce


def heal(model: GPT, parent: GPT, data: str | Path, *, max_time: float | None = None, max_steps: int | None = None,
         kl_weight: float = 0.5, lr: float = 1e-3, batch_size: int = 16, seq_len: int = 256,
         keep_zeros: Sequence[Tensor] = (), schedule: CubicSchedule | None = None, seed: int = 0,
         progress: bool = False) -> dict[str, Any]:
    """Train `model` in place for `max_time` seconds and/or `max_steps` steps on the train split of the prepared data
    directory `data`, distilled from `parent` (frozen); the zeros of each tensor in `keep_zeros` (parameters of
    `model`) stay zeros. With a `schedule`, those tensors are also pruned by magnitude as training goes (gradual
    pruning, the module docstring), ending at schedule.final. Returns what ran: steps, tokens, seconds and the
    settings.

    >>> heal(pruned, parent, "runs/data/shk", max_time=300, keep_zeros=list(pruned.parameters()))  # doctest: +SKIP
    >>> gradual = CubicSchedule(0.9)
    >>> heal(dense, parent, "runs/data/shk", max_time=300, keep_zeros=mats, schedule=gradual)  # doctest: +SKIP
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
    updates: list[tuple[int, float]] = []  # (step, sparsity) of each mask recomputation

    @torch.no_grad()
    def prune_to(s: float) -> list[tuple[Tensor, Tensor]]:
        new = [(p, keep & magnitude_keep(p, s)) for p, keep in masks]  # a pruned weight stays pruned
        for p, keep in new:
            p.mul_(keep)
        updates.append((step, round(s, 6)))
        return new

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
            if schedule is not None and step % schedule.every == 0:
                masks = prune_to(schedule.sparsity(done()))
            set_lr(optimizer, tc, lr_at(tc, step, done()))
            x, y = batcher.next()
            with torch.no_grad(), autocast(precision):
                parent_logits, _ = parent(x)
            with autocast(precision):
                logits, ce = model(x, y, return_logits=True)  # both: the KL term reads the logits
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
    if schedule is not None:  # a budget too short for the schedule's last update still ends at the final sparsity
        prune_to(schedule.final)
    model.eval().requires_grad_(False)
    gradual = None if schedule is None else {**asdict(schedule), "updates": len(updates), "steps": updates}
    return {"steps": step, "tokens": step * batch_size * T, "seconds": round(seconds, 3), "kl_weight": kl_weight,
            "lr": lr, "batch_size": batch_size, "seq_len": T, "data": str(Path(data).resolve()), "gradual": gradual}


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
                     schedule: CubicSchedule | None = None, progress: bool = False) -> dict[str, Any]:
    """The end of a compression stage: heal `model` if a budget is given, and compare it with `parent` on `data`
    (before and after healing). Returns {"heal": record | None, "quality": compare_to_parent | None}."""
    if data is None or parent is None:
        return {"heal": None, "quality": None}
    healed = None
    if max_time is not None or max_steps is not None:
        before = compare_to_parent(model, parent, data)
        healed = heal(model, parent, data, max_time=max_time, max_steps=max_steps, kl_weight=kl_weight, lr=lr,
                      keep_zeros=keep_zeros, schedule=schedule, progress=progress)
        healed["before"] = before
    return {"heal": healed, "quality": compare_to_parent(model, parent, data)}
