"""`slm finetune`: a model run in, a fine-tuned run out — the loop written out, like slmkit/train/loop.py, whose
pieces it reuses (random windows, Ctrl-C handling, metrics log, progress bar, optimizers and schedules).

    slm finetune runs/smollm2 --data shakespeare --task lm --method lora --max-time 10m --out runs/smollm2-shk
    slm finetune runs/smollm2 --data bbc-news --task classify --method lora --max-steps 300 --out runs/bbc-clf
    slm classify runs/bbc-clf "The striker scored twice in the second half."

The three tasks differ only in their batches, loss and evaluation, chosen once above the loop (`_LMTask`,
`_ChatTask`, `_ClassifyTask`); the loop itself is the same. Every `eval_interval` steps the held-out split is scored;
the best val loss so far is kept in `best/` (what the run finally writes), and `patience` evaluations without a better
one stop the run early.

Run directory:
    out/meta.json            kind "finetune": lineage (the base, pinned by its meta.json hash, + the recipe), task,
                             method, base, data, configs, params (total, trainable), labels, status, before (the
                             base's val metrics), best, test, result, and `artifact` once a model is written
    out/model.safetensors    the fine-tuned model (LoRA merged; classify: the body) + config.json, or, with
      or adapter.safetensors merge=False, only the LoRA factors (LLM.load adds them to the base)
    out/head.safetensors     classify: the head; labels are in meta.json
    out/tokenizer.json       the base's tokenizer (+ tokenizer_config.json)
    out/data/                lm from a corpus: the shards prepared with the base's tokenizer
    out/best/                the trained tensors of the best evaluation so far
    out/checkpoints/step_N/  for --resume: trainable tensors (not the frozen base), optimizer, RNG, sampler state
    out/metrics.jsonl, out/loss.png (lm)
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from slmkit import checkpoint, run
from slmkit.config import TrainConfig
from slmkit.data import load_split, prepare
from slmkit.data.corpora import source_files
from slmkit.errors import SlmError
from slmkit.finetune.config import FinetuneConfig, default_train_config
from slmkit.finetune.data import Conversations, Labelled, RowSampler, load_chat, load_labelled, pad_rows
from slmkit.finetune.lora import add_lora, load_lora_state, lora_state, merge_lora
from slmkit.finetune.model import (
    Base,
    Classifier,
    base_pin,
    checkpoint_blocks,
    encode_texts,
    freeze_int8,
    load_base,
    pinned_base,
)
from slmkit.fsutil import atomic_dir, write_json
from slmkit.infer.neural import _headless
from slmkit.metrics import bits_per_byte, lm_loss
from slmkit.model import GPT
from slmkit.model.loss import cross_entropy
from slmkit.runtime import autocast, resolve_precision, set_threads
from slmkit.tokenizer import Tokenizer
from slmkit.train.loop import Batcher, MetricsLog, StopFlag, _progress_bar, _resumed_config
from slmkit.train.optim import build_optimizer, clip_gradients, lr_at
from slmkit.train.report import plot_metrics


@dataclass
class FinetuneResult:
    run_dir: Path
    status: str  # finished | early-stopped | interrupted
    step: int
    tokens: int  # real (non-pad) tokens trained on
    train_time: float  # seconds of optimisation: what tokens_per_s divides by
    tokens_per_s: float
    train_loss: float
    best_step: int
    before: dict[str, float]  # held-out metrics of the base (step 0)
    best: dict[str, float]  # held-out metrics of the model written
    test: dict[str, float] | None  # classify: test-split metrics of the model written
    trainable_params: int
    total_params: int
    peak_rss_mb: float  # this process's peak resident memory so far
    eval_time: float = 0.0
    wall_time: float = 0.0


# --- the tasks: batches, loss and evaluation ----------------------------------------------------------------------


def _spread(n: int, limit: int | None) -> np.ndarray:
    """Indices of at most `limit` of n rows, evenly spread (the same ones at every evaluation)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


class _LMTask:
    """Continued pretraining: random windows of the train shard; held-out loss and bits per byte on val windows."""

    def __init__(self, data_dir: Path, tc: TrainConfig, T: int, precision: str, eval_rows: int | None):
        self.train, self.val = load_split(data_dir, "train"), load_split(data_dir, "val")
        self.sampler = Batcher(self.train.tokens, tc.batch_size, T, tc.seed)
        self.T, self.B, self.precision, self.eval_rows = T, tc.batch_size, precision, eval_rows

    def batch(self) -> tuple[tuple[Tensor, Tensor], int]:
        x, y = self.sampler.next()
        return (x, y), x.numel()

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return net(*batch)[1]

    def evaluate(self, net: nn.Module, split: str = "val") -> dict[str, float]:
        loss = lm_loss(net, self.val.tokens, block_size=self.T, batch_size=self.B, max_windows=self.eval_rows,
                       precision=self.precision)
        return {"loss": loss, "bpb": bits_per_byte(loss, self.val.bytes_per_token)}


def _chat_tensors(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs (B, T) padded with `pad_id` and targets (B, T): the next token where it is an assistant token, else -1."""
    x, _ = pad_rows([ids[:-1] for ids, _ in rows], pad_id)
    y = torch.full_like(x, -1)
    for i, (ids, mask) in enumerate(rows):
        y[i, : len(ids) - 1] = torch.where(torch.as_tensor(mask[1:]), torch.as_tensor(ids[1:]), -1)
    return x, y


def masked_lm_loss(model: GPT, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy on the positions whose target is not -1 (assistant tokens). The head runs on those
    rows only: the (B, T, V) logits of a 49k vocabulary would be most of a step's memory, and most rows are prompt."""
    with _headless(model) as head:
        hidden, _ = model(x)  # (B, T, C)
    keep = y != -1
    return cross_entropy(head(hidden[keep]), y[keep], reduction=reduction)


class _ChatTask:
    """Conversations, one per row; loss only on assistant tokens; held-out loss per assistant token."""

    def __init__(self, conv: Conversations, tc: TrainConfig, pad_id: int, precision: str, eval_rows: int | None):
        self.rows, self.pad_id, self.precision, self.B = conv.splits, pad_id, precision, tc.batch_size
        self.sampler = RowSampler(len(self.rows["train"]), tc.batch_size, tc.seed)
        self.eval_idx = _spread(len(self.rows["val"]), eval_rows)

    def batch(self) -> tuple[tuple[Tensor, Tensor], int]:
        x, y = _chat_tensors([self.rows["train"][i] for i in self.sampler.next()], self.pad_id)
        return (x, y), int((x != self.pad_id).sum())

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return masked_lm_loss(net, *batch)

    @torch.no_grad()
    def evaluate(self, net: nn.Module, split: str = "val") -> dict[str, float]:
        rows = [self.rows["val"][i] for i in self.eval_idx]
        rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding
        total, count = 0.0, 0
        with _eval_mode(net):
            for i in range(0, len(rows), self.B):
                x, y = _chat_tensors(rows[i : i + self.B], self.pad_id)
                with autocast(self.precision):
                    total += float(masked_lm_loss(net, x, y, reduction="sum"))
                count += int((y != -1).sum())
        return {"loss": total / count}


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for a scoring pass, then back to what it was."""
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def classification_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """accuracy and macro-F1 (the unweighted mean of each class's F1 over the classes present in `true` or `pred`,
    as scikit-learn's f1_score(average="macro") counts them)."""
    f1 = []
    for c in np.union1d(pred, true):
        tp = int(((pred == c) & (true == c)).sum())
        fp, fn = int(((pred == c) & (true != c)).sum()), int(((pred != c) & (true == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float((pred == true).mean()), "macro_f1": float(np.mean(f1))}


class _ClassifyTask:
    """Labelled texts, one per row; cross-entropy of the head; held-out loss, accuracy and macro-F1."""

    def __init__(self, data: Labelled, tok: Tokenizer, T: int, tc: TrainConfig, precision: str,
                 eval_rows: int | None):
        self.rows = {s: (encode_texts(tok, [t for t, _ in rows], T), np.array([y for _, y in rows], np.int64))
                     for s, rows in data.splits.items()}
        self.pad_id, self.precision, self.B, self.eval_rows = tok.pad_id, precision, tc.batch_size, eval_rows
        self.sampler = RowSampler(len(self.rows["train"][0]), tc.batch_size, tc.seed)

    def batch(self) -> tuple[tuple[Tensor, Tensor, Tensor], int]:
        ids, labels = self.rows["train"]
        pick = self.sampler.next()
        x, lengths = pad_rows([ids[i] for i in pick], self.pad_id)
        return (x, lengths, torch.from_numpy(labels[pick])), int(lengths.sum())

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, lengths, y = batch
        return F.cross_entropy(net(x, lengths).float(), y)

    @torch.no_grad()
    def evaluate(self, net: nn.Module, split: str = "val") -> dict[str, float]:
        """The periodic evaluation scores a fixed, evenly spread sample of val; the final one all of `split`."""
        ids, labels = self.rows[split]
        pick = _spread(len(ids), self.eval_rows if split == "val" else None)
        pick = pick[np.argsort([len(ids[i]) for i in pick], kind="stable")]  # similar lengths together
        logits = []
        with _eval_mode(net):
            for i in range(0, len(pick), self.B):
                x, lengths = pad_rows([ids[j] for j in pick[i : i + self.B]], self.pad_id)
                with autocast(self.precision):
                    logits.append(net(x, lengths).float())
        z = torch.cat(logits)
        true = labels[pick]
        loss = float(F.cross_entropy(z, torch.from_numpy(true)))
        return {"loss": loss, **classification_metrics(z.argmax(-1).numpy(), true)}


# --- helpers ---------------------------------------------------------------------------------------------------------


def _lm_data(data: str | Path, tok: Tokenizer, base: Path) -> Path | None:
    """A prepared data directory to train on, checked against the base's tokenizer; None when `data` names a corpus
    to prepare with it (checked to exist now, before anything is written)."""
    if run.kind_of(data) == "data":
        shard = load_split(data, "train")
        if shard.tokenizer_sha256 != tok.sha256:
            spec = run.read_meta(data).get("tokenizer", {}).get("spec", "another tokenizer")
            raise SlmError(f"{data} was tokenized with {spec} (sha256 {shard.tokenizer_sha256[:12]}), not the base's "
                           f"{tok.spec} tokenizer (sha256 {tok.sha256[:12]}); prepare it with the base's: slm data "
                           f"prepare --corpus SOURCE --tokenizer {base / 'tokenizer.json'}, or pass the corpus itself")
        return Path(data)
    source_files(str(data))  # a missing path or an unknown corpus name: one line now
    return None


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _load_tensors(params: dict[str, nn.Parameter], file: Path) -> None:
    sd = checkpoint.read_weights(file)
    if set(sd) != set(params):
        raise SlmError(f"{file} holds other tensors than this run trains ({sorted(set(sd) ^ set(params))[:2]}); the "
                       f"file does not belong to this run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name])


def _param_groups(net: nn.Module, model: GPT, fc: FinetuneConfig, tc: TrainConfig) -> list[dict[str, Any]]:
    """What the optimizer updates: every weight (full; grouped as the trainer groups them), or the LoRA factors; and
    a classifier's head, at its own lr (`lr_scale` × the schedule)."""
    groups: list[dict[str, Any]] = []
    if fc.method == "full":
        groups = model.param_groups(tc.weight_decay)
    elif fc.method == "lora":
        factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # LoRA+: the B factors (zero at init, they make the update) at lora_plus × the schedule's lr, A at 1 ×; plain
        # LoRA keeps one group (the optimizer state of runs written before LoRA+ resumes as it was)
        parts = [("lora_a", 1.0), ("lora_b", fc.lora_plus)] if fc.lora_plus != 1 else [("", 1.0)]
        for part, scale in parts:
            groups.append({"params": [p for n, p in factors.items() if n.endswith(part)], "kind": "matrix",
                           "weight_decay": tc.weight_decay, "lr_scale": scale})
    if isinstance(net, Classifier):
        groups.append({"params": list(net.head.parameters()), "weight_decay": 0.0, "kind": "vector",
                       "lr_scale": fc.head_lr / tc.lr})
    return groups


def _check_resumable_config(out: Path, saved: FinetuneConfig, given: FinetuneConfig | None) -> FinetuneConfig:
    if given is None:
        return saved
    old, new = saved.to_dict(), given.to_dict()
    fixed = sorted(k for k in new if new[k] != old[k] and k not in FinetuneConfig.RESUMABLE)
    if fixed:
        raise SlmError(f"{out}: {', '.join(fixed)} cannot change on resume (it is part of the run's recipe); only "
                       f"{', '.join(FinetuneConfig.RESUMABLE)} and the budget can. Start a new run to change it")
    return given


def _write_artifact(out: Path, net: nn.Module, model: GPT, base: Base, fc: FinetuneConfig) -> dict[str, Any]:
    """The model the run hands on, from the trained state now in `net` (the best one): written into a hidden directory,
    then each file renamed into `out`; meta.json, written after, is what records them. Returns the artifact record."""
    staging = out / ".artifact"
    shutil.rmtree(staging, ignore_errors=True)
    with atomic_dir(staging) as tmp:
        if not fc.merge:
            body = "adapter" if fc.method == "lora" else "base"  # full fine-tuning always merges (FinetuneConfig)
            if fc.method == "lora":
                _save_tensors(tmp / "adapter.safetensors", lora_state(model))
        else:
            body = "full"
            if fc.base_weights == "int8":  # the update goes into the fp32 base weights, never into rounded ones
                full = load_base(base.path).model
                if fc.method == "lora":
                    add_lora(full, rank=fc.lora_rank, alpha=fc.lora_alpha, targets=fc.lora_targets,
                             layers=fc.lora_layers)
                    load_lora_state(full, lora_state(model), "the trained adapter")
            else:
                full = model
            checkpoint.write_model(tmp, merge_lora(full))
        if isinstance(net, Classifier):
            _save_tensors(tmp / "head.safetensors", dict(net.head.state_dict()))
        base.tokenizer.save(tmp / "tokenizer.json")
        run.write_meta(tmp, {"kind": "checkpoint", "note": "staging; moved into the run"})  # atomic_dir's marker
    files = sorted(f.name for f in staging.iterdir() if f.name != "meta.json")
    for name in files:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging)
    stale = {"model.safetensors", "config.json", "adapter.safetensors"} - set(files)
    for name in stale:  # a file of another body kind must not outlive its meta
        (out / name).unlink(missing_ok=True)
    return {"body": body, "files": files}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- the stage -----------------------------------------------------------------------------------------------------


def finetune(
    base: str | Path | None,
    data: str | Path | None,
    out: str | Path,
    config: FinetuneConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the model at `base` (a run or checkpoint: trained, imported or fine-tuned) on `data` and write the run
    `out` (the module docstring lists what it holds).

    `data`: for task lm, a data directory prepared with the base's tokenizer, or a corpus (built-in name, file or
    directory) prepared with it into out/data; for classify, a labelled corpus (slmkit.finetune.data); for chat, a
    JSONL of conversations. `train_config` defaults to `default_train_config(config.method)`; give a budget
    (max_steps and/or max_time).

    >>> finetune("runs/smollm2", "shakespeare", "runs/smollm2-shk", FinetuneConfig(task="lm", method="lora"),
    ...          default_train_config("lora", max_time="10m"))  # doctest: +SKIP
    >>> finetune(None, None, "runs/smollm2-shk", resume=True)  # continue where it stopped  # doctest: +SKIP

    On resume the run's base, data and recipe are kept; a given `train_config` may change only its budget and threads,
    a given `config` only `patience`.
    """
    wall_t0 = time.perf_counter()
    out = Path(out)
    # --- decide everything above the loop -------------------------------------------------------------------------
    replace, changed = False, {}
    if resume:
        if base is not None or data is not None:
            raise SlmError("a resumed run keeps its base and data; drop them")
        run_meta = run.read_meta(out, kinds=("finetune",))
        ckpts = checkpoint.list_checkpoints(out)
        if not ckpts:
            raise SlmError(f"cannot resume {out}: it has no checkpoint yet (it stopped before its first one); "
                           f"start it again with --overwrite")
        opt_state, state = checkpoint.load_train_state(ckpts[-1])
        fc = _check_resumable_config(out, FinetuneConfig.from_dict(run_meta["finetune"]), config)
        tc, changed = _resumed_config(out, TrainConfig.from_dict(run_meta["train"]), train_config, state["step"],
                                      state["train_time"])
        if fc.patience != run_meta["finetune"]["patience"]:
            changed["patience"] = fc.patience
        base_dir = pinned_base(run_meta, out)
        source = run_meta["source"]
    else:
        if base is None or data is None:
            raise SlmError("give the model to fine-tune (a run or checkpoint) and --data")
        fc = config or FinetuneConfig()
        tc = train_config or default_train_config(fc.method)
        replace = run.check_out(out, overwrite=overwrite, inputs=tuple(p for p in (base, data) if Path(p).exists()))
        # a path is recorded absolute (a resume may start elsewhere); a built-in corpus by its name
        base_dir, source = Path(base), str(Path(data).resolve()) if Path(data).exists() else str(data)
    if tc.max_steps is None and tc.max_time is None:
        raise SlmError("give a budget: --max-steps N and/or --max-time 5m")
    if tc.optimizer == "muon":
        raise SlmError("fine-tuning uses adamw or sgd: Muon orthogonalises whole weight matrices, which LoRA factors "
                       "and a pretrained model's small updates are not")
    if tc.compile:
        raise SlmError("--compile is for slm train; fine-tuning runs eagerly")
    threads = set_threads(tc.threads)
    precision = resolve_precision(tc.precision)

    b = load_base(base_dir)
    tok, cfg = b.tokenizer, b.model.config
    T = min(fc.seq_len, cfg.block_size)
    eval_rows = None if tc.eval_windows == "all" else \
        tc.eval_windows if isinstance(tc.eval_windows, int) else tc.eval_batches * tc.batch_size
    labelled = conv = data_dir = None
    if fc.task == "lm":
        data_dir = Path(run_meta["data"]) if resume else _lm_data(source, tok, b.path)
    elif fc.task == "classify":
        labelled = load_labelled(source, seed=fc.split_seed, val_fraction=fc.val_fraction,
                                 test_fraction=fc.test_fraction)
    else:
        conv = load_chat(source, tok, max_len=T + 1, seed=fc.split_seed, val_fraction=fc.val_fraction)
    digest = (labelled or conv).digest() if (labelled or conv) else None
    if resume and digest != run_meta.get("data_digest"):
        raise SlmError(f"cannot resume {out}: {source} has changed since the run started (its texts, labels or split "
                       f"differ)")

    total_params = b.model.num_params()  # before int8 packing and LoRA change what counts as a parameter
    torch.manual_seed(tc.seed)  # LoRA's A and the head are drawn from the run's seed
    model = b.model
    if fc.base_weights == "int8":
        freeze_int8(model)
    if fc.method == "lora":
        add_lora(model, rank=fc.lora_rank, alpha=fc.lora_alpha, dropout=fc.lora_dropout, targets=fc.lora_targets,
                 layers=fc.lora_layers)
    for p in model.parameters():
        p.requires_grad_(fc.method == "full" or (fc.method == "lora" and p.requires_grad))
    net: nn.Module = Classifier(model, labelled.labels, tok, max_len=T) if labelled else model
    if isinstance(net, Classifier):
        total_params += sum(p.numel() for p in net.head.parameters())
    if fc.grad_checkpoint:
        checkpoint_blocks(model)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(_param_groups(net, model, fc, tc), tc)

    # --- the run directory: nothing is written above this line ------------------------------------------------------
    if not resume:
        if replace:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if fc.task == "lm" and data_dir is None:
            try:
                data_dir = prepare(source, b.path / "tokenizer.json", out / "data", val_fraction=fc.val_fraction,
                                   seed=fc.split_seed, progress=progress)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)  # a corpus that cannot be read leaves nothing behind
                raise
    if fc.task == "lm":
        task: Any = _LMTask(data_dir, tc, T, precision, eval_rows)
    elif fc.task == "classify":
        task = _ClassifyTask(labelled, tok, T, tc, precision, eval_rows)
    else:
        task = _ChatTask(conv, tc, tok.pad_id, precision, eval_rows)

    step, tokens_seen, train_time, bad_evals = 0, 0, 0.0, 0
    best_loss, best_step, best_metrics = math.inf, 0, {}
    if resume:
        ckpt = ckpts[-1]
        _load_tensors(trainable, ckpt / "trainable.safetensors")
        optimizer.load_state_dict(opt_state["optimizer"])
        torch.set_rng_state(opt_state["torch_rng"])
        task.sampler.load_state(state["sampler"])
        step, tokens_seen, train_time, bad_evals = state["step"], state["tokens"], state["train_time"], state["bad"]
        # best/ holds the best model any invocation of this run has seen, and its own metrics
        best = checkpoint.read_json(out / "best" / "meta.json")
        best_loss, best_step, best_metrics = best["val"]["loss"], best["step"], best["val"]
        run_meta.update(finetune=fc.to_dict(), train=tc.to_dict(), runtime={"threads": threads, "precision": precision},
                        status="running")
        run_meta.setdefault("resumes", []).append({"step": step, "changed": changed, "at": run.now()})
    else:
        adapter = {"rank": fc.lora_rank, "alpha": fc.lora_alpha, "targets": fc.lora_targets, "layers": fc.lora_layers} \
            if fc.method == "lora" else None
        split_sizes = ({s: len(r) for s, r in labelled.splits.items()} if labelled else
                       {s: len(r) for s, r in conv.splits.items()} if conv else None)
        run_meta = run.new_meta(
            "finetune", parent=b.path, model_class=run.model_class(b.meta),
            recipe={"task": fc.task, "source": source, "finetune": fc.to_dict(), "train": tc.to_dict()},
            task=fc.task, method=fc.method, base=base_pin(b.path), source=source,
            data=None if data_dir is None else str(Path(data_dir).resolve()),
            data_meta=None if data_dir is None else {"tokenizer_sha256": tok.sha256,
                                                     "bytes_per_token": task.val.bytes_per_token},
            data_digest=digest, split=split_sizes, labels=labelled.labels if labelled else None,
            chat={"truncated": conv.truncated, "dropped": conv.dropped} if conv else None,
            finetune=fc.to_dict(), train=tc.to_dict(), adapter=adapter,
            runtime={"threads": threads, "precision": precision},
            params={"total": total_params, "trainable": sum(p.numel() for p in trainable.values())},
            eval={"rows": eval_rows, "seq_len": T}, status="running",
        )
    run.write_meta(out, run_meta)
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if resume else None)

    def progress_of(step: int, train_time: float) -> float:
        return max(step / tc.max_steps if tc.max_steps else 0.0, train_time / tc.max_time if tc.max_time else 0.0)

    def save_best(metrics: dict[str, float]) -> None:
        with atomic_dir(out / "best", overwrite=True) as tmp:
            _save_tensors(tmp / "trainable.safetensors", trainable)
            run.write_meta(tmp, {"kind": "checkpoint", "step": step, "val": metrics, "train": tc.to_dict(),
                                 "created": run.now()})

    def save_checkpoint() -> None:
        with atomic_dir(checkpoint.step_dir(out, step), overwrite=True) as tmp:
            _save_tensors(tmp / "trainable.safetensors", trainable)  # the frozen base is read from its own run
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
            write_json(tmp / "trainer_state.json", {"step": step, "tokens": tokens_seen, "train_time": train_time,
                                                    "bad": bad_evals, "sampler": task.sampler.state()})
            run.write_meta(tmp, {"kind": "checkpoint", "step": step, "tokens": tokens_seen, "train": tc.to_dict(),
                                 "created": run.now()})  # written last: its presence marks a complete checkpoint
        checkpoint.prune(out, tc.keep_checkpoints)

    # --- the loop ---------------------------------------------------------------------------------------------------
    stop = StopFlag()
    bar = _progress_bar(progress)
    bar_task = bar.add_task("", total=1.0)
    status, last_loss, eval_time = "finished", float("nan"), 0.0
    window_time, window_tokens = 0.0, 0
    loss_sum = torch.zeros(())
    start_step = step
    net.train()
    with stop.installed(), bar:
        while True:
            done = progress_of(step, train_time) >= 1.0
            if stop.requested:
                done, status = True, "interrupted"
            if (step % tc.eval_interval == 0 and not (resume and step == start_step)) or done:
                t0 = time.perf_counter()
                metrics = task.evaluate(net)
                eval_time += time.perf_counter() - t0
                log.write({"step": step, "tokens": tokens_seen, "time": round(train_time, 3),
                           **{f"val_{k}": v for k, v in metrics.items()}})
                if step == 0:
                    run_meta["before"] = metrics
                if metrics["loss"] < best_loss:
                    best_loss, best_step, best_metrics, bad_evals = metrics["loss"], step, metrics, 0
                    save_best(metrics)
                else:
                    bad_evals += 1
                    if fc.patience is not None and bad_evals >= fc.patience and not done:
                        done, status = True, "early-stopped"
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                bar.console.print(f"step {step}: val {shown}" + (" (best)" if best_step == step else ""))
            if step > start_step and (step % tc.ckpt_interval == 0 or done):
                save_checkpoint()
            if done:
                break

            t0 = time.perf_counter()
            lr = lr_at(tc, step, progress_of(step, train_time))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum.zero_()
            for _ in range(tc.grad_accum):
                batch, n_tokens = task.batch()
                with autocast(precision):
                    loss = task.loss(net, batch)
                aux = model.aux_loss  # MoE load balancing: trained on only when the router is
                ((loss if aux is None or not aux.requires_grad else loss + aux) / tc.grad_accum).backward()
                loss_sum += loss.detach()
                tokens_seen += n_tokens
                window_tokens += n_tokens
            if tc.grad_clip > 0:
                clip_gradients(optimizer, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            window_time += dt
            if step % tc.log_interval == 0:
                last_loss = loss_sum.item() / tc.grad_accum  # the only sync with the loss: once per log interval
                if not math.isfinite(last_loss):
                    raise SlmError(f"loss became {last_loss} at step {step}; lower --lr")
                tps = window_tokens / max(window_time, 1e-9)
                window_time, window_tokens = 0.0, 0
                log.write({"step": step, "tokens": tokens_seen, "time": round(train_time, 3), "lr": lr,
                           "loss": last_loss, "tok_per_s": round(tps)})
                bar.update(bar_task, completed=min(1.0, progress_of(step, train_time)),
                           description=f"step {step} loss {last_loss:.3f} {tps:,.0f} tok/s")
    log.close()
    if last_loss != last_loss and step > start_step:  # never logged (a very short run): one sync now
        last_loss = loss_sum.item() / tc.grad_accum
    if fc.task == "lm":
        plot_metrics(log.records, out / "loss.png", bytes_per_token=task.val.bytes_per_token)

    # --- hand on the best model -------------------------------------------------------------------------------------
    _load_tensors(trainable, out / "best" / "trainable.safetensors")
    test = task.evaluate(net, "test") if labelled else None
    artifact = _write_artifact(out, net, model, b, fc)
    result = FinetuneResult(
        run_dir=out, status=status, step=step, tokens=tokens_seen, train_time=train_time,
        tokens_per_s=tokens_seen / train_time if train_time else 0.0, train_loss=last_loss, best_step=best_step,
        before=run_meta.get("before", {}), best=best_metrics, test=test,
        trainable_params=run_meta["params"]["trainable"], total_params=total_params, peak_rss_mb=_peak_rss_mb(),
        eval_time=eval_time, wall_time=time.perf_counter() - wall_t0,
    )
    run_meta.update(status=status, best={"step": best_step, **best_metrics}, test=test, artifact=artifact,
                    result={k: v for k, v in result.__dict__.items() if k not in ("run_dir", "before", "best",
                                                                                  "test")})
    run.write_meta(out, run_meta)
    return result
