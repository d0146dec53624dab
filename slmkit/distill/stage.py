"""`slm distill`: a student trained on a teacher's next-token distributions — the trainer's loop (slmkit.train.loop)
with an Objective: the batches are the teacher cache's windows and the loss is slmkit.distill.losses'.

    slm distill --teacher runs/smollm2 --student llama-3m --data runs/data/shk-smol --max-time 10m --out runs/d3m

1. The teacher's top-k distribution at every position of a fixed set of train windows is computed once into a cache
   (slmkit.distill.cache; default DATA/teacher-cache/<key>/, where every student of the same teacher, data and
   settings finds it). An interrupted teacher pass continues where it stopped when the command is run again.
2. The student — a preset built with the teacher's vocabulary (and at most the teacher's context), or a run whose
   weights it continues from — trains on exactly those windows: each epoch visits every cached window once in a
   seeded order, for as many epochs as the budget allows. The window length is the student's block_size.
3. The run is an ordinary training run (checkpoints, metrics.jsonl with the distillation loss as "loss", the
   periodic val evaluation in nats/token and bits per byte against the hard labels) of kind "distill": its lineage
   names the teacher (pinned by its meta.json hash) and the recipe (student, loss, temperature, alpha, k, cache key).
   `slm distill --resume RUN` continues it exactly, like `slm train --resume`.

Hidden-state matching adds hidden_weight · MSE(P·h_s, h_t) on the final hidden states (after the last norm), with P
a learned linear map from the student's width to the teacher's (the identity when they are equal). P trains with the
student, is kept in the checkpoints' optimizer.pt for resume, and is not part of the model written. The teacher's
hidden states are cached rather than computed live — a live teacher forward would cost several student steps per
step — at C_teacher fp16 values per position (C/(3k) times the top-k arrays).

Memory: the loss reads the student's full logits, a few (B, L, V) fp32 tensors at once (batch × window × vocabulary
values each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmkit import checkpoint, run
from slmkit.config import PRESETS, ModelConfig, TrainConfig, _check, _check_choice, _Serializable
from slmkit.data import load_split
from slmkit.distill.cache import CachedWindows, CacheSpec, DistillBatch, build_cache, starts_sha256, window_starts
from slmkit.distill.losses import distill_loss
from slmkit.errors import SlmError
from slmkit.finetune.model import Base, base_pin, load_base
from slmkit.infer.neural import _headless
from slmkit.model import GPT
from slmkit.runtime import resolve_precision, set_threads
from slmkit.train.loop import Objective, TrainResult, train

Loss = Literal["fkl", "rkl", "mix"]
CacheDtype = Literal["fp16", "fp32"]


@dataclass
class DistillConfig(_Serializable):
    """What the student learns from the teacher (slmkit.distill.losses: fkl, rkl, mix) and which teacher cache it
    reads. The optimisation and budget are an ordinary TrainConfig."""

    loss: Loss = "mix"
    alpha: float = 0.5  # mix: weight of the τ²-scaled forward KL; 1 − alpha goes to the hard-label cross-entropy
    temperature: float = 1.0
    top_k: int = 64  # teacher tokens cached per position (at most the vocabulary)
    hidden_match: bool = False  # also match the final hidden states through a learned projection
    hidden_weight: float = 1.0
    windows: int | None = None  # train windows cached and trained on; None = every non-overlapping window
    window_seed: int = 0  # which windows, when fewer than all
    cache_dtype: CacheDtype = "fp16"  # storage of the cached log-probs

    def __post_init__(self) -> None:
        _check_choice(self, "loss", Loss)
        _check_choice(self, "cache_dtype", CacheDtype)
        _check(0 <= self.alpha <= 1, f"DistillConfig.alpha={self.alpha} must be in [0, 1]")
        _check(self.temperature > 0, f"DistillConfig.temperature={self.temperature} must be positive (typical 1-4)")
        _check(self.top_k >= 1, f"DistillConfig.top_k={self.top_k} must be >= 1")
        _check(self.hidden_weight >= 0, f"DistillConfig.hidden_weight={self.hidden_weight} must be >= 0")
        _check(self.windows is None or self.windows >= 1, f"DistillConfig.windows={self.windows} must be >= 1")


@dataclass
class DistillResult:
    train: TrainResult  # the student's training: steps, time, final val loss and bpb
    cache: Path
    cache_key: str
    teacher_time: float  # seconds the teacher pass took (all invocations that built this cache), not in train_time
    epochs: float  # passes over the cached windows


def _load_model(path: str | Path, role: str) -> Base:
    """A teacher or student run/checkpoint in fp32 (trained, imported, fine-tuned or distilled)."""
    kind = run.kind_of(path)
    if kind == "ngram":
        raise SlmError(f"the {role} {path} is an n-gram model: distillation needs a neural model's logits")
    if kind != "finetune" and run.kind_of(checkpoint.resolve(path)) == "quantize":
        raise SlmError(f"the {role} {path} holds packed quantized weights; use the model it was quantized from (its "
                       f"meta.json lineage)")
    return load_base(path)


def _student(student: str | Path | ModelConfig, teacher: Base) -> tuple[ModelConfig, dict[str, Any], Base | None]:
    """The student's model config, how the recipe names it, and its run when it continues one."""
    tcfg = teacher.model.config
    if isinstance(student, ModelConfig) or str(student) in PRESETS:
        cfg = student if isinstance(student, ModelConfig) else ModelConfig.preset(str(student))
        ref = {"model": cfg.to_dict()} if isinstance(student, ModelConfig) else {"preset": str(student)}
        # the teacher's vocabulary (its distributions are over those ids) and at most its context
        return cfg.replace(vocab_size=tcfg.vocab_size, block_size=min(cfg.block_size, tcfg.block_size)), ref, None
    if not Path(student).exists():
        raise SlmError(f"--student {student} is neither a model preset ({', '.join(PRESETS)}) nor a run directory")
    s = _load_model(student, "student")
    if s.tokenizer.sha256 != teacher.tokenizer.sha256 or s.model.config.vocab_size != tcfg.vocab_size:
        raise SlmError(f"the student {student} uses the {s.tokenizer.spec} tokenizer (sha256 "
                       f"{s.tokenizer.sha256[:12]}) and the teacher {teacher.path} the {teacher.tokenizer.spec} one "
                       f"(sha256 {teacher.tokenizer.sha256[:12]}): distillation compares their next-token "
                       f"distributions id by id, so they must share one tokenizer")
    if s.model.config.block_size > tcfg.block_size:
        raise SlmError(f"the student {student} has a context of {s.model.config.block_size} tokens, longer than the "
                       f"teacher's {tcfg.block_size}; the teacher cannot score its windows")
    return s.model.config, base_pin(s.path), s


def _objective_loss(dc: DistillConfig, proj: nn.Module) -> Callable[[GPT, DistillBatch], Tensor]:
    def loss(model: GPT, b: DistillBatch) -> Tensor:
        with _headless(model) as head:
            h, _ = model(b.x)  # (B, L, C) final hidden states
        logits = head(h)  # (B, L, V)
        total = distill_loss(logits, b.y, b.ids, b.logp, b.log_rest, loss=dc.loss, temperature=dc.temperature,
                             alpha=dc.alpha)
        if b.hidden is not None:
            total = total + dc.hidden_weight * F.mse_loss(proj(h).float(), b.hidden.float())
        return total

    return loss


def _checked(tc: TrainConfig) -> TrainConfig:
    """`tc`, refused before the teacher is loaded when the student could not train with it."""
    if tc.max_steps is None and tc.max_time is None:
        raise SlmError("give a budget: --max-steps N and/or --max-time 5m")
    if tc.compile:
        raise SlmError("--compile is for slm train; distillation runs eagerly (its loss takes the hidden states "
                       "apart from the head)")
    return tc


def _pinned_teacher(meta: dict[str, Any], out: Path) -> Path:
    pin = meta["teacher"]
    path = Path(pin["path"])
    if not path.exists():
        raise SlmError(f"{out} was distilled from {path}, which is gone; restore it there to resume")
    if base_pin(path).get("meta_sha256") != pin.get("meta_sha256"):
        raise SlmError(f"{out}: its teacher {path} has changed since the run started (its meta.json differs); "
                       f"resume needs the original teacher")
    return path


def distill(
    teacher: str | Path | None,
    student: str | Path | ModelConfig | None,
    data: str | Path | None,
    out: str | Path,
    config: DistillConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    cache: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> DistillResult:
    """Distill `teacher` (a run or checkpoint) into `student` (a preset name, a ModelConfig, or a run to continue)
    on `data` (a directory prepared with the teacher's tokenizer) and write the run `out` (module docstring).

    >>> distill("runs/smollm2", "llama-3m", "runs/data/shk-smol", "runs/d3m", DistillConfig(temperature=2.0),
    ...         TrainConfig(max_time="10m"))  # doctest: +SKIP
    >>> distill(None, None, None, "runs/d3m", resume=True)  # continue where it stopped  # doctest: +SKIP

    `cache` is the teacher cache directory (default DATA/teacher-cache/<key>). On resume the run's teacher, student,
    data, cache and DistillConfig are kept; a given `train_config` may change only its budget and threads.
    """
    out = Path(out)
    # --- decide everything before the teacher pass ------------------------------------------------------------------
    if resume:
        if teacher is not None or student is not None or data is not None or cache is not None:
            raise SlmError("a resumed run keeps its teacher, student, data and cache; drop them")
        meta = run.read_meta(out, kinds=("distill",))
        dc = DistillConfig.from_dict(meta["distill"])
        if config is not None and config != dc:
            raise SlmError(f"{out}: the distillation settings cannot change on resume (they are part of the run's "
                           f"recipe); start a new run to change them")
        tc = _checked(train_config or TrainConfig.from_dict(meta["train"]))
        teacher_path = _pinned_teacher(meta, out)
        spec, cache_dir = CacheSpec(**meta["cache"]["spec"]), Path(meta["cache"]["dir"])
        data_dir, model_cfg, init, new_meta = Path(meta["data"]), ModelConfig.from_dict(meta["model"]), None, {}
        t_base: Base | None = None
        hidden_width = None
        tokens = load_split(data_dir, "train").tokens
        starts = window_starts(len(tokens), spec.seq_len, dc.windows, dc.window_seed)
        if starts_sha256(starts) != spec.starts:
            raise SlmError(f"{data_dir} has changed since {out} started (its train windows differ); resume needs the "
                           f"original data")
    else:
        if teacher is None or student is None or data is None:
            raise SlmError("slm distill needs --teacher RUN, --student PRESET|RUN, --data DIR and --out DIR")
        dc = config or DistillConfig()
        tc = _checked(train_config or TrainConfig())
        data_dir, teacher_path = Path(data), Path(teacher)
        shard = load_split(data_dir, "train")
        t_base = _load_model(teacher, "teacher")
        tok = t_base.tokenizer
        if shard.tokenizer_sha256 != tok.sha256:
            spec_name = run.read_meta(data_dir).get("tokenizer", {}).get("spec", "another tokenizer")
            raise SlmError(f"{data_dir} was tokenized with {spec_name} (sha256 {shard.tokenizer_sha256[:12]}), not the "
                           f"teacher's {tok.spec} tokenizer (sha256 {tok.sha256[:12]}); prepare it with the teacher's: "
                           f"slm data prepare --corpus SOURCE --tokenizer {t_base.path / 'tokenizer.json'}")
        if t_base.model.config.vocab_size != tok.vocab_size:
            raise SlmError(f"the teacher {teacher} has {t_base.model.config.vocab_size} output ids but its tokenizer "
                           f"{tok.vocab_size}; the student would be trained on ids no text produces")
        model_cfg, student_ref, s_base = _student(student, t_base)
        init = s_base.model.state_dict() if s_base is not None else None
        run.check_out(out, overwrite=overwrite, inputs=(teacher_path, data_dir,
                                                        *([s_base.path] if s_base is not None else [])))
        tokens = shard.tokens
        L = model_cfg.block_size
        starts = window_starts(len(tokens), L, dc.windows, dc.window_seed)
        spec = CacheSpec(
            teacher=base_pin(t_base.path)["meta_sha256"], data=shard.meta["sha256"], seq_len=L, windows=len(starts),
            starts=starts_sha256(starts), top_k=min(dc.top_k, tok.vocab_size), temperature=dc.temperature,
            dtype=dc.cache_dtype, hidden=dc.hidden_match, precision=resolve_precision(tc.precision))
        cache_dir = Path(cache) if cache is not None else data_dir / "teacher-cache" / spec.key
        hidden_width = t_base.model.config.n_embd
        new_meta = {"teacher": base_pin(t_base.path), "student": student_ref, "distill": dc.to_dict()}
        new_meta["lineage"] = run.lineage(t_base.path, {
            "stage": "distill", "data": str(data_dir.resolve()), "student": student_ref, "distill": dc.to_dict(),
            "cache_key": spec.key, "model": model_cfg.to_dict(), "train": tc.to_dict()})

    # --- the teacher pass (once per cache), then the student --------------------------------------------------------
    set_threads(tc.threads)

    def load_teacher() -> GPT:
        return (t_base or _load_model(teacher_path, "teacher")).model

    teacher_cache = build_cache(cache_dir, spec, load_teacher, tokens, starts, progress=progress)
    if hidden_width is None and teacher_cache.hidden is not None:
        hidden_width = teacher_cache.hidden.shape[-1]
    t_base = None  # the teacher's weights are not needed past its pass: free them before the student's

    torch.manual_seed(tc.seed)
    width = model_cfg.n_embd
    proj: nn.Module = nn.Linear(width, hidden_width, bias=False) if dc.hidden_match and width != hidden_width \
        else nn.Identity()
    # a resumed run's batch size and seed are its own: train() refuses a train_config that changes them
    sampler = CachedWindows(teacher_cache, tokens, tc.batch_size, tc.seed, hidden=dc.hidden_match)
    cache_record = {"dir": str(cache_dir.resolve()), "key": spec.key, "spec": asdict(spec),
                    "teacher_time": teacher_cache.seconds}
    objective = Objective("distill", sampler, _objective_loss(dc, proj), meta={**new_meta, "cache": cache_record},
                          extra=proj if any(True for _ in proj.parameters()) else None, init=init)
    result = train(None if resume else data_dir, out, None if resume else model_cfg, tc, resume=resume,
                   overwrite=overwrite, progress=progress, objective=objective)
    final = run.read_meta(out)
    final.update(cache=cache_record, epochs=round(sampler.epochs, 4))
    run.write_meta(out, final)
    return DistillResult(result, cache_dir, spec.key, teacher_cache.seconds, sampler.epochs)
