"""The training loop, written out: build → loop { batch, forward, backward, clip, step, schedule, eval, checkpoint }.

Run directory:
    out/meta.json           the run contract (slmkit.run): kind "train", lineage (the data it was trained on + the
                            recipe), model and train config, versions, eval sample, resumes, status/result
    out/metrics.jsonl       one record per log/eval step
    out/loss.png            loss curves
    out/checkpoints/step_N/ see slmkit.checkpoint
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slmkit import checkpoint, run
from slmkit.config import ModelConfig, TrainConfig
from slmkit.data import load_split, load_tokenizer
from slmkit.errors import SlmError
from slmkit.metrics import bits_per_byte, lm_loss
from slmkit.model import GPT
from slmkit.runtime import autocast, resolve_precision, set_threads
from slmkit.train.optim import build_optimizer, clip_gradients, lr_at, set_lr
from slmkit.train.report import plot_metrics


class Batcher:
    """Random (B, T) windows from a memory-mapped token array; its RNG state is part of the checkpoint, so a resumed
    run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int):
        if len(tokens) < block_size + 2:
            raise SlmError(f"the train split has {len(tokens)} tokens, fewer than one context of {block_size + 1}; "
                           f"use more data or a smaller block_size")
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.T - 1, size=self.B)
        chunk = torch.from_numpy(self.tokens[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to stop at the next step boundary (and checkpoint); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class MetricsLog:
    """metrics.jsonl: appended line by line; on resume, records past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a kill can leave a partial last line
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.file = path.open("a", buffering=1)

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.file.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.file.close()


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    train_time: float  # seconds of optimisation (forward, backward, step); what tokens_per_s divides by
    tokens_per_s: float
    train_loss: float
    val_loss: float
    val_bpb: float
    num_params: int
    status: str
    first_step_time: float = 0.0  # seconds of the first step of this invocation: one-off warm-up, incl. any compile
    eval_time: float = 0.0  # seconds spent scoring the val split (this invocation)
    ckpt_time: float = 0.0  # seconds spent writing checkpoints (this invocation)
    wall_time: float = 0.0  # seconds of this invocation, start to finish: set-up, training, evaluation, checkpoints


@dataclass
class Objective:
    """What a stage built on this loop changes in it (slm distill), decided above the loop; the loop stays the same.

    Batches come from `batches` (anything with next(), state() and load_state(), like Batcher: its state goes into
    each checkpoint) and `loss(model, batch)` replaces the next-token cross-entropy. `extra` holds trainable modules
    that are not part of the model (a projection for hidden-state matching): optimized with it and kept in each
    checkpoint's optimizer.pt for resume, never in the model written. `init` is a state dict the model starts from
    instead of its random init. The run's meta.json gets kind `kind`, and `meta` (e.g. its lineage) replaces or adds
    fields.
    """

    kind: str
    batches: Any
    loss: Callable[[nn.Module, Any], Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    extra: nn.Module | None = None
    init: dict[str, Tensor] | None = None


def _next_token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return model(*batch)[1]


def _progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console()
    return Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
        disable=not (enabled and console.is_terminal),  # logs and pipes get the eval lines, not bar redraws
    )


EVAL_SHARE = 0.1  # auto evaluation aims at <= this share of the training compute
FINAL_EVAL_FACTOR = 4  # the final evaluation scores this many times the windows of a periodic one


def _resumed_config(out: Path, saved: TrainConfig, given: TrainConfig | None, step: int,
                    train_time: float) -> tuple[TrainConfig, dict[str, Any]]:
    """The config a resumed run continues with: the saved one, with only TrainConfig.RESUMABLE fields changed (and a
    budget that goes past where the run stands). Returns it and the changed fields."""
    given = given or saved
    old, new = saved.to_dict(), given.to_dict()
    changed = {k: new[k] for k in new if new[k] != old[k]}
    fixed = sorted(set(changed) - set(TrainConfig.RESUMABLE))
    if fixed:
        what = ", ".join(f"{k} ({old[k]!r} → {new[k]!r})" for k in fixed)
        raise SlmError(f"{out}: {what} cannot change on resume (it is part of the run's recipe); only "
                       f"{', '.join(TrainConfig.RESUMABLE)} can. Start a new run to change it")
    if given.max_steps is not None and given.max_steps <= step:
        raise SlmError(f"{out} is at step {step}: --max-steps {given.max_steps} does not go past it; give a larger one")
    if given.max_time is not None and given.max_time <= train_time:
        raise SlmError(f"{out} has trained for {train_time:.0f}s: --max-time {given.max_time:.0f}s does not go past "
                       f"it; give a longer one")
    return given, changed


def _auto_eval_windows(tc: TrainConfig, model: GPT, val_tokens: np.ndarray, block: int, precision: str) -> int:
    """Windows per periodic evaluation for eval_windows="auto": the cap (eval_batches × batch_size), fewer when the
    evaluations of the whole run would cost more than EVAL_SHARE of its training compute. A forward pass costs about
    a third of a training step per token, so the evaluations may score up to 3·EVAL_SHARE × the training tokens. For a
    time budget the training tokens are estimated from a timed forward pass of one batch (a training token ≈ 3x)."""
    cap = tc.eval_batches * tc.batch_size
    tokens_per_step = tc.batch_size * tc.grad_accum * block
    expected = []
    if tc.max_steps:
        expected.append(tc.max_steps * tokens_per_step)
    if tc.max_time:
        x = torch.from_numpy(val_tokens[: min(len(val_tokens) - 1, tc.batch_size * block)].astype(np.int64))
        x = x[: len(x) // block * block].view(-1, block) if len(x) >= block else x[None]
        with torch.no_grad(), autocast(precision):
            model.eval()
            model(x)  # warm-up: first calls pay one-off costs
            t0 = time.perf_counter()
            model(x)
            fwd_tps = x.numel() / max(time.perf_counter() - t0, 1e-9)
            model.train()
        expected.append(tc.max_time * fwd_tps / 3)
    train_tokens = min(expected)
    n_evals = 1 + FINAL_EVAL_FACTOR + int(train_tokens / tokens_per_step) // tc.eval_interval
    affordable = int(3 * EVAL_SHARE * train_tokens / (n_evals * block))
    return max(min(8, cap), min(cap, affordable))


def train(
    data: str | Path | None,
    out: str | Path,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    objective: Objective | None = None,
) -> TrainResult:
    """Train a model on prepared shards (`slm data prepare`) and write a run directory.

    >>> train("runs/data/shk", "runs/shk-small", ModelConfig.preset("llama-3m"), TrainConfig(max_time=300))
    >>> train(None, "runs/shk-small", resume=True)   # continue exactly where it stopped

    On resume, the model, data and train config come from the run; a given `train_config` may change only its budget
    and threads (TrainConfig.RESUMABLE: a longer max_time/max_steps), and the change is recorded in meta.json.
    `overwrite` replaces an existing `out` only if slmkit wrote it (slmkit.run.check_out). `objective` changes the
    batches, loss, starting weights and run kind (slm distill; see Objective); a resumed run needs the same one again.
    """
    wall_t0 = time.perf_counter()
    out = Path(out)
    # --- decide everything above the loop -------------------------------------------------------------------------
    resume_from: Path | None = None
    changed: dict[str, Any] = {}
    replace = False
    if resume:
        if model_config is not None or data is not None:
            raise SlmError("a resumed run keeps its model and data; drop the model config and data")
        run_meta = run.read_meta(out, kinds=(objective.kind if objective is not None else "train",))
        ckpts = checkpoint.list_checkpoints(out)
        if not ckpts:
            raise SlmError(f"cannot resume {out}: it has no checkpoint yet (it stopped before its first one); "
                           f"start it again with --overwrite")
        resume_from = ckpts[-1]
        data = Path(run_meta["data"])
        model_config = ModelConfig.from_dict(run_meta["model"])
        saved = TrainConfig.from_dict(run_meta["train"])
        opt_state, state = checkpoint.load_train_state(resume_from)
        tc, changed = _resumed_config(out, saved, train_config, state["step"], state["train_time"])
    else:
        if data is None:
            raise SlmError("give the prepared data directory (--data), e.g. from `slm data prepare`")
        replace = run.check_out(out, overwrite=overwrite, inputs=(data,))
        tc = train_config or TrainConfig()
    if tc.max_steps is None and tc.max_time is None:
        raise SlmError("give a budget: --max-steps N and/or --max-time 5m")
    data = Path(data)
    train_shard, val_shard = load_split(data, "train"), load_split(data, "val")
    if resume and run_meta["data_meta"]["tokenizer_sha256"] != train_shard.tokenizer_sha256:
        raise SlmError(f"{data} was re-prepared with another tokenizer since {out} started; resume needs the original")
    tokenizer = load_tokenizer(data)
    model_config = (model_config or ModelConfig()).replace(vocab_size=tokenizer.vocab_size)
    threads = set_threads(tc.threads)
    precision = resolve_precision(tc.precision)
    T = model_config.block_size

    torch.manual_seed(tc.seed)
    model = GPT(model_config)
    if objective is not None and objective.init is not None:
        model.load_state_dict(objective.init)
    extra = objective.extra if objective is not None else None
    groups = model.param_groups(tc.weight_decay)
    if extra is not None:
        groups.append({"params": list(extra.parameters()), "weight_decay": tc.weight_decay, "kind": "embedding"})
    optimizer = build_optimizer(groups, tc)
    batcher = objective.batches if objective is not None else Batcher(train_shard.tokens, tc.batch_size, T, tc.seed)
    loss_of = objective.loss if objective is not None else _next_token_loss
    step, tokens_seen, train_time = 0, 0, 0.0
    if resume_from is not None:
        checkpoint.load_weights(model, resume_from / "model.safetensors")
        if extra is not None:
            extra.load_state_dict(opt_state["extra"])
        optimizer.load_state_dict(opt_state["optimizer"])
        torch.set_rng_state(opt_state["torch_rng"])
        batcher.load_state(state["batcher"])
        step, tokens_seen, train_time = state["step"], state["tokens"], state["train_time"]
    forward = torch.compile(model) if tc.compile else model

    # the number of windows each evaluation scores is chosen once and kept for the run's life (resumes included), so
    # every point of the val curve is measured on the same text
    if resume and "eval" in run_meta:
        eval_windows = run_meta["eval"]["windows"]
    elif tc.eval_windows == "all":
        eval_windows = None
    elif tc.eval_windows == "auto":
        eval_windows = _auto_eval_windows(tc, model, val_shard.tokens, T, precision)
        torch.manual_seed(tc.seed)  # the timing forward drew no random numbers, but keep the run's stream exact
    else:
        eval_windows = tc.eval_windows

    if replace:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        run_meta["train"] = tc.to_dict()
        run_meta["runtime"] = {"threads": threads, "precision": precision}
        run_meta.setdefault("resumes", []).append({"step": step, "changed": changed, "at": run.now()})
        run_meta["status"] = "running"
    else:
        run_meta = run.new_meta(
            "train", parent=data, model_class="moe" if model_config.moe_experts else "dense",
            recipe={"model": model_config.to_dict(), "train": tc.to_dict()},
            data=str(data.resolve()),
            data_meta={"tokenizer_sha256": train_shard.tokenizer_sha256,
                       "bytes_per_token": val_shard.bytes_per_token},
            model=model_config.to_dict(), train=tc.to_dict(),
            runtime={"threads": threads, "precision": precision},
            params={"total": model.num_params(), "non_embedding": model.num_params(non_embedding=True),
                    "active": model.num_params(active=True), "flops_per_token": model.flops_per_token()},
            eval={"windows": eval_windows, "final_windows": None if eval_windows is None else
                  eval_windows * FINAL_EVAL_FACTOR, "block_size": T},
            status="running",
        )
        if objective is not None:  # its kind, lineage and own fields
            run_meta.update(kind=objective.kind, **objective.meta)
    run.write_meta(out, run_meta)
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if resume else None)

    tokens_per_step = tc.batch_size * tc.grad_accum * T

    def progress_of(step: int, train_time: float) -> float:
        p = 0.0
        if tc.max_steps:
            p = max(p, step / tc.max_steps)
        if tc.max_time:
            p = max(p, train_time / tc.max_time)
        return p

    def evaluate(final: bool = False) -> tuple[float, float]:
        # fixed, evenly spread windows (the same text at every eval); the final eval reads FINAL_EVAL_FACTOR x as
        # many. Eager even with --compile: each new eval batch shape would cost another compile
        windows = None if eval_windows is None else eval_windows * (FINAL_EVAL_FACTOR if final else 1)
        loss = lm_loss(model, val_shard.tokens, block_size=T, batch_size=tc.batch_size, max_windows=windows,
                       precision=precision)
        return loss, bits_per_byte(loss, val_shard.bytes_per_token)

    def save_checkpoint(val: tuple[float, float] | None) -> None:
        meta = {
            "kind": "checkpoint", "step": step, "tokens": tokens_seen, "train_time": round(train_time, 3),
            "val_loss": val[0] if val else None, "val_bpb": val[1] if val else None,
            "data": run_meta["data"], "data_meta": run_meta["data_meta"], "train": tc.to_dict(),
            "model_class": run_meta.get("model_class"), "params": run_meta["params"],
            "versions": run_meta["versions"], "created": run.now(),
        }
        checkpoint.save(
            checkpoint.step_dir(out, step), model, tokenizer, meta,
            optimizer_state={"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                             **({"extra": extra.state_dict()} if extra is not None else {})},
            trainer_state={"step": step, "tokens": tokens_seen, "train_time": train_time,
                           "batcher": batcher.state()},
        )
        checkpoint.prune(out, tc.keep_checkpoints)

    # --- the loop ---------------------------------------------------------------------------------------------------
    stop = StopFlag()
    bar = _progress_bar(progress)
    task = bar.add_task("", total=1.0)
    last_loss, last_val, status = float("nan"), None, "finished"
    first_step_time = eval_time = ckpt_time = 0.0
    window_time, window_tokens = 0.0, 0  # optimisation time and tokens since the last log record (no eval in it)
    loss_sum = torch.zeros(())  # this step's micro-batch losses, summed without a sync
    grad_norm: torch.Tensor | None = None
    model.train()
    with stop.installed(), bar:
        start_step = step
        if tc.compile:
            bar.console.print("compiling the model on the first step (one-off: ~30 s the first time, seconds once "
                              "torch has cached it)")
        while True:
            done = progress_of(step, train_time) >= 1.0
            if stop.requested:
                done, status = True, "interrupted"
            if step % tc.eval_interval == 0 or done:
                t0 = time.perf_counter()
                last_val = evaluate(final=done)
                eval_time += time.perf_counter() - t0
                log.write({"step": step, "tokens": tokens_seen, "time": round(train_time, 3),
                           "val_loss": last_val[0], "val_bpb": last_val[1]})
                bar.console.print(f"step {step}: val loss {last_val[0]:.4f} nats/token, {last_val[1]:.4f} bpb")
            if step > start_step and (step % tc.ckpt_interval == 0 or done):
                t0 = time.perf_counter()
                save_checkpoint(last_val)
                ckpt_time += time.perf_counter() - t0
            if done:
                break

            t0 = time.perf_counter()
            lr = lr_at(tc, step, progress_of(step, train_time))
            set_lr(optimizer, tc, lr)
            loss_sum.zero_()
            for _ in range(tc.grad_accum):
                batch = batcher.next()
                with autocast(precision):
                    loss = loss_of(forward, batch)
                aux = model.aux_loss  # MoE load balancing (None when dense): trained on, never reported as the loss
                ((loss if aux is None else loss + aux) / tc.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = clip_gradients(optimizer, tc.grad_clip) if tc.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            if step % tc.log_interval == 0:
                last_loss = loss_sum.item() / tc.grad_accum  # the only sync with the loss: once per log interval
                if not math.isfinite(last_loss):
                    raise SlmError(f"loss became {last_loss} at step {step}; lower --lr or enable grad_clip")
            dt = time.perf_counter() - t0
            train_time += dt
            window_time += dt
            if step == start_step + 1:
                first_step_time = dt
            if step % tc.log_interval == 0:
                tps = window_tokens / max(window_time, 1e-9)
                window_time, window_tokens = 0.0, 0
                rec = {"step": step, "tokens": tokens_seen, "time": round(train_time, 3), "lr": lr,
                       "loss": last_loss, "tok_per_s": round(tps)}
                if grad_norm is not None:
                    rec["grad_norm"] = round(float(grad_norm), 4)  # before clipping
                moe = model.moe_stats()  # None when dense; else routing of the last micro-batch, per layer
                if moe is not None:
                    rec.update(expert_util=moe["expert_util"], moe_aux=moe["aux"], moe_dropped=moe["dropped"])
                log.write(rec)
                val_txt = f" val {last_val[1]:.3f} bpb" if last_val else ""
                bar.update(task, completed=min(1.0, progress_of(step, train_time)),
                           description=f"step {step} loss {last_loss:.3f}{val_txt} {tps:,.0f} tok/s")
    log.close()
    if last_loss != last_loss:  # never logged (very short run): one sync now
        last_loss = loss_sum.item() / tc.grad_accum if step > start_step else float("nan")
    plot_metrics(log.records, out / "loss.png", bytes_per_token=val_shard.bytes_per_token)
    result = TrainResult(
        run_dir=out, step=step, tokens=tokens_seen, train_time=train_time,
        tokens_per_s=tokens_seen / train_time if train_time else 0.0, train_loss=last_loss,
        val_loss=last_val[0], val_bpb=last_val[1], num_params=model.num_params(), status=status,
        first_step_time=first_step_time, eval_time=eval_time, ckpt_time=ckpt_time,
        wall_time=time.perf_counter() - wall_t0,
    )
    run_meta.update(status=status, result={k: v for k, v in result.__dict__.items() if k != "run_dir"})
    run.write_meta(out, run_meta)
    return result
